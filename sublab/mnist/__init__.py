"""The paper's MNIST experiment (Cloud et al., 2025): subliminal learning through auxiliary logits.

A teacher MLP learns digits; a student sharing its init, trained only to match the teacher's never-trained
auxiliary logits on uniform noise images, learns to classify digits too; a student from another init does
not. N models per arm train in parallel as one batched computation.

Layout: `config` (MnistConfig, sweeps), `data` (MNIST / IDX / npz / sklearn-digits loaders, noise inputs),
`model` (stacked MLPs), `train` (teacher and student loops), `experiment` (run, sweep, results, CIs),
`report` (rich tables, figures), `command` (the typer CLI).

Run: `sublab mnist` (default run), `sublab mnist --sweep weight_decay`, or from Python
`sublab.mnist.run(MnistConfig(n_models=8))`.
"""

from sublab.mnist.command import cli
from sublab.mnist.config import SWEEPS, MnistConfig
from sublab.mnist.experiment import ArmResult, MnistResults, SweepResults, run, sweep

__all__ = ["ArmResult", "MnistConfig", "MnistResults", "SWEEPS", "SweepResults", "cli", "run", "sweep"]
