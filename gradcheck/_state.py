"""Process-wide state that a check must touch, and the one lock that guards it.

Some frameworks keep their random generator in global state (NumPy's legacy
``np.random`` functions, torch's default generator). A check resets that state
before every evaluation, so that a dropout mask is the same each time, and puts
the caller's state back afterwards. Two checks in two threads would otherwise
reset and restore each other's state in between: each evaluation that touches
such state holds `GLOBAL_STATE` from the save to the restore. It is re-entrant,
so a model that itself runs a check (or an adapter that nests evaluations) does
not deadlock.

What holds under threads: concurrent checks give the same reports as the same
checks run one after another, and every caller's global RNG state is restored.
Code of the user's that draws from a global generator in another thread while a
check evaluates is not protected (nothing can be).
"""

from __future__ import annotations

import threading

#: held around every evaluation that resets and restores global (process-wide) RNG state
GLOBAL_STATE = threading.RLock()
