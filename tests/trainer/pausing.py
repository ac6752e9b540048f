"""`python -m trainer`, paused after a chosen checkpoint until a signal (tests).

`python -m tests.trainer.pausing STEP ARGS...` runs the trainer with ARGS.
Right after the checkpoint of step STEP is written it prints PAUSED and
waits for SIGTERM, which it then hands to the trainer's own handler as if it
had arrived at that moment, or for SIGKILL. A test reads the output up to
that line and signals then: the signal lands at a known step however loaded
the machine is, with no deadline racing the work. Nothing in `trainer/`
knows about this; it wraps `trainer.checkpoint.save`.
"""

import os
import signal
import sys
import time
from typing import Any, Callable, Sequence

PAUSED = 'tests.trainer.pausing: paused after saving step'


def _pause_after(save: Callable[..., None], pause_step: int
                 ) -> Callable[..., None]:
  def save_then_pause(manager: Any, step: int, state: Any,
                      **kwargs: Any) -> None:
    save(manager, step, state, **kwargs)
    if step != pause_step:
      return
    received = []
    trainers = signal.signal(signal.SIGTERM,
                             lambda signum, frame: received.append(signum))
    print(f'{PAUSED} {step}', flush=True)
    while not received:
      # Python runs signal handlers in the main thread between bytecodes;
      # short sleeps let it run whichever thread the kernel delivered to.
      time.sleep(0.01)
    signal.signal(signal.SIGTERM, trainers)
    if callable(trainers):
      trainers(signal.SIGTERM, None)

  return save_then_pause


def main(argv: Sequence[str]) -> int:
  from trainer import __main__ as entry  # pylint: disable=g-import-not-at-top
  from trainer import checkpoint  # pylint: disable=g-import-not-at-top
  checkpoint.save = _pause_after(checkpoint.save, int(argv[1]))
  return entry.main(['trainer', *argv[2:]])


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  sys.exit(main(sys.argv))
