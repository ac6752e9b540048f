"""Default run: the seed CNN on MNIST, SGD with momentum.

Every key the code reads is declared here, with a one-line comment. Variants
import this module and override fields (see configs/tiny.py).
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """Returns the default training configuration."""
  config = ml_collections.ConfigDict()

  config.seed = 0  # Seeds the parameter init and the order of the batches.

  # Data.
  config.data_source = 'auto'  # 'auto' | 'embedded' | 'tfds' | 'idx'.
  # tfds: where TFDS keeps prepared MNIST; idx: the folder of the 4 idx files.
  config.data_dir = '~/tensorflow_datasets'
  config.classes = tuple(range(10))  # Digit labels, remapped to 0..k-1.

  # Model.
  config.model = ml_collections.ConfigDict()
  config.model.name = 'cnn'  # A name from trainer.models.MODELS.
  config.model.api = 'linen'  # 'linen' | 'nnx': the Flax API of the model.
  # Output classes; derived from `classes` when unset, an error if it differs.
  config.model.num_classes = config_dict.placeholder(int)

  # Optimizer.
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'sgd'  # 'sgd' | 'adam' | 'adamw'.
  config.optimizer.learning_rate = 0.1  # Peak learning rate.
  config.optimizer.schedule = 'constant'  # 'constant' | 'cosine' | 'warmup_cosine'.
  config.optimizer.warmup_steps = 0  # Linear warm-up steps ('warmup_cosine').
  config.optimizer.momentum = 0.9  # sgd: momentum (0 for plain SGD).
  config.optimizer.nesterov = False  # sgd: Nesterov momentum.
  config.optimizer.b1 = 0.9  # adam, adamw: first-moment decay.
  config.optimizer.b2 = 0.999  # adam, adamw: second-moment decay.
  config.optimizer.eps = 1e-8  # adam, adamw: numerical stability term.
  config.optimizer.weight_decay = 0.0  # adamw: decoupled weight decay.

  # Length and batches.
  config.batch_size = 128  # Global batch size, split over all devices.
  config.num_epochs = 30  # Training length in epochs of the train split.
  # Training length in steps; overrides num_epochs when set.
  config.num_train_steps = config_dict.placeholder(int)
  config.eval_batch_size = 500  # Global eval batch; the last one is padded.

  # Devices: a mesh over every device of every process; batches split on data.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.axes = ('data', 'model')  # Mesh axis names; 'data' is required.
  config.mesh.shape = (-1, 1)  # One size per axis; -1: the devices left over.
  # (regex over param paths, PartitionSpec tuple), first full match wins;
  # unmatched params replicated, slots follow their param. Python literal on
  # the command line: "[('Dense_0/kernel', (None, 'model'))]".
  config.partition_rules = config_dict.FieldReference((), field_type=object)

  # Logging, evaluation and checkpoints.
  config.log_every_steps = 50  # Train metrics are written this often.
  config.eval_every_steps = 310  # Full test-split evaluation this often.
  config.checkpoint_every_steps = 310  # Checkpoints are saved this often.
  config.keep_checkpoints = 3  # The latest K are kept, plus the best one.
  config.progress_bar = 'auto'  # 'auto' (when stdout is a terminal) | 'on' | 'off'.
  config.compilation_cache_dir = ''  # JAX persistent compilation cache ('' = off).
  # Exit 1 at the next log/eval/checkpoint after a NaN/inf loss or grad norm.
  config.stop_on_nonfinite = True
  # Resume from this checkpoint step, not the latest (past a damaged one).
  config.resume_step = config_dict.placeholder(int)

  # Compilation of the jitted steps (trainer/xla.py; README, "CPU speed").
  config.xla = ml_collections.ConfigDict()
  # 'auto' (Eigen convolutions on CPU) | 'eigen' | 'xla_default' (YNNPACK).
  config.xla.cpu_convolutions = 'auto'
  # Extra XLA options, {name: value}, for every step's jit; theirs win.
  config.xla.compiler_options = config_dict.placeholder(object)

  # Surgery: hooks edit a flat '/'-keyed view of params and optimizer state.
  # A checkpoint to start from when the workdir has none of its own: another
  # run's workdir, one of its step directories, or a legacy flax msgpack file.
  config.init_from = ''
  config.hooks = ml_collections.ConfigDict()
  # Run on a fresh state before step 0: entries {'name': ..., **params}.
  # Type object: --config.hooks.post_init="[{'name': ...}]" (a Python literal).
  config.hooks.post_init = config_dict.FieldReference([], field_type=object)
  # Run on init_from's checkpoint before it is restored into this run's state.
  config.hooks.pre_restore = config_dict.FieldReference([], field_type=object)
  config.freeze = ml_collections.ConfigDict()
  # Regexes over param paths (e.g. 'Conv_.*') frozen from step 0.
  config.freeze.patterns = ()
  # Empty: frozen throughout; else one step per pattern, when it unfreezes.
  config.freeze.unfreeze_steps = ()

  return config
