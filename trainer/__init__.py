"""Config-driven training of Flax models on MNIST, with surgery hooks.

`import trainer` stays light: TensorFlow (which clu's TensorBoard writer
needs) is imported only when a run starts writing metrics.
"""

from trainer.errors import CheckpointError
from trainer.errors import ConfigError
from trainer.errors import DataError
from trainer.errors import TrainerError
from trainer.errors import WorkdirError
from trainer.train import train_and_evaluate

__all__ = [
    'CheckpointError', 'ConfigError', 'DataError', 'TrainerError',
    'WorkdirError', 'train_and_evaluate',
]
