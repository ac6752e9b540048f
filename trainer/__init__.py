"""Config-driven training of Flax models on MNIST, with surgery hooks.

`train_and_evaluate(config, workdir)` runs a whole training; `Run` is the
same run as parts (prepare, start or restore a state, jitted steps, batches,
evaluate, predict) for experiments, benchmarks and one's own loop.

`import trainer` stays light: TensorFlow (which clu's TensorBoard writer
needs) is imported only when a run starts writing metrics.
"""

from trainer.errors import CheckpointError
from trainer.errors import ConfigError
from trainer.errors import DataError
from trainer.errors import TrainerError
from trainer.errors import WorkdirError
from trainer.run import Run
from trainer.run import Start
from trainer.train import train_and_evaluate

__all__ = [
    'CheckpointError', 'ConfigError', 'DataError', 'Run', 'Start',
    'TrainerError', 'WorkdirError', 'train_and_evaluate',
]
