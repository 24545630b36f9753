"""One helper for every layer's bad-input tests: a named error, raised before anything is traced.

The house rule (docs/architecture.md, "Numerics and errors"): bad input gets a `ValueError` or
`TypeError` that names the argument, raised by the pre-trace checks. `raises_before_tracing`
checks all three: the error type, that the message names the argument (a regex), and that no
frame of the traceback is inside JAX's tracing machinery (`jit`, `make_jaxpr`, `shard_map`,
`lax` control flow) or holds a tracer, so an error thrown from inside a traced function, however
clear, fails the test.
"""

from __future__ import annotations

import contextlib
import re
import types

import jax
import pytest

# Modules whose frames mean "we are inside a trace" when they appear in a traceback.
_TRACING_FILES = (
    "jax/_src/pjit.py",
    "jax/_src/interpreters/partial_eval.py",
    "jax/_src/linear_util.py",
    "jax/_src/lax/control_flow",
    "jax/_src/shard_map.py",
    "jax/experimental/shard_map.py",
    "jax/_src/pallas/pallas_call.py",
)


def traced_frames(tb: types.TracebackType | None) -> list[str]:
  """The frames of `tb` that belong to JAX tracing or hold a tracer (empty: raised pre-trace)."""
  found = []
  while tb is not None:
    frame = tb.tb_frame
    filename = frame.f_code.co_filename.replace("\\", "/")
    where = f"{filename}:{tb.tb_lineno} in {frame.f_code.co_name}"
    if any(part in filename for part in _TRACING_FILES):
      found.append(where)
    elif any(isinstance(v, jax.core.Tracer) for v in frame.f_locals.values()):
      found.append(f"{where} (holds a tracer)")
    tb = tb.tb_next
  return found


@contextlib.contextmanager
def raises_before_tracing(error: type[BaseException] | tuple[type[BaseException], ...],
                          names: str):
  """`with raises_before_tracing(ValueError, "steps"):` — the error, naming `names`, pre-trace.

  `names` is a regular expression searched in the message (usually the argument's name).
  """
  with pytest.raises(error) as info:
    yield info
  message = str(info.value)
  assert re.search(names, message), f"message does not name {names!r}: {message!r}"
  inside = traced_frames(info.tb)
  assert not inside, (f"{type(info.value).__name__} ({message!r}) was raised while tracing:\n  "
                      + "\n  ".join(inside))
