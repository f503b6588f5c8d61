"""Students: SFT (LoRA or full fine-tuning) and logit distillation on a teacher's dataset.

Reads  a dataset JSONL (rows `{"messages": [user, assistant], ...}`, no system message), the base model,
       and for distillation a live teacher (any `LiveTeacher`, e.g. `sublab.teachers.Teacher`).
Writes `out_dir/` (= runs/<exp>/students/<teacher>-seed<k>/):
       adapter_model.safetensors + adapter_config.json   LoRA, PEFT's format; base_model_name_or_path is
                                                         the base model *ref*, so load_model(out_dir) works
       model.safetensors + config.json + tokenizer       full fine-tuning
       loss.jsonl      one line per optimizer step: step, loss, lr, tokens, elapsed, grad_norm
       checkpoint/     while running (every `checkpoint_every` steps): trainable params, optimizer, RNG,
                       step; a killed run resumes from it; deleted when the run finishes
       manifest.json   written last: data sha256, hyperparameters, seed, loss summary, wall time, tokens/s

    from sublab.train import train_student
    manifest = train_student(TrainConfig(), base_ref="embedded:smollm2-135m-instruct",
                             dataset=Path("runs/x/teachers/owl/dataset.jsonl"),
                             out_dir=Path("runs/x/students/owl-seed0"), seed=0)

Layout: `data` (rows → token ids → batches, the `LiveTeacher` protocol), `losses` (completion logits,
SFT and distillation losses), `loop` (student model, checkpoints, the training loop).

Every row is encoded with `chat.encode_pair` in the default context (system=None): the loss covers the
completion tokens only (the answer and its turn terminator). For distillation the teacher sees the same
completion after *its* context (a trait system prompt, or its own weights), so the two prompts differ in
length; both sequences are right-padded and we read the hidden state at "prompt length - 1 + j" in each,
which aligns completion token j exactly.

Why an explicit loop rather than TRL's SFTTrainer: one short loop serves SFT and distillation alike, and
distillation needs two differently-prompted sequences aligned per completion token, which SFTTrainer has
no notion of (TRL's GKDTrainer mixes in on-policy generation instead). Owning the loop also lets us
(1) run the LM head only at completion positions (SmolLM2's 49k×576 head is 21% of its FLOPs per token,
and completions are ~20% of a row's tokens), (2) drop the attention mask (right padding + causal
attention never sees the pads, so SDPA takes its is_causal path), (3) make resume exact: the data order
is a pure function of the seed, and the checkpoint holds everything else that changes.
"""

from sublab.train.data import (
    Batch,
    Encoded,
    Example,
    LiveTeacher,
    batch_plan,
    collate,
    encode_examples,
    load_dataset,
)
from sublab.train.loop import build_student, reference_sha256, save_student, student_fingerprint, train_student
from sublab.train.losses import completion_logits, distill_loss, format_columns, sft_loss, teacher_targets

__all__ = [
    "Batch", "Encoded", "Example", "LiveTeacher", "batch_plan", "build_student", "collate",
    "completion_logits", "distill_loss", "encode_examples", "format_columns", "load_dataset",
    "reference_sha256", "save_student", "sft_loss", "student_fingerprint", "teacher_targets", "train_student",
]
