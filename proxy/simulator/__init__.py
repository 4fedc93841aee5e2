"""A local stand-in for Alibaba Cloud DashScope image generation.

Serves DashScope's native image endpoints under `/api/v1` well enough that the official
`dashscope` SDK cannot tell it from the real service: request validation per model, sync JSON
and SSE answers, async tasks moving PENDING -> RUNNING -> SUCCEEDED/FAILED on a schedule, real
PNG images at signed expiring URLs, local-file uploads, and DashScope's errors on demand.
Used by the gateway's demo, tests and benchmarks; it imports nothing from the gateway.

Modules, from the edges in:
  __main__    the `dashscope-sim` command line
  app         `create_sim_app`: routes, the middleware (ids, recording, auth, error rendering)
  generation  handlers of E1-E4 (sync, SSE, sync_call, task submission)
  task_routes handlers of E5-E7 (poll, cancel, list)
  support     uploads (E8 + upload host), signed images, the `/_sim/*` test API
  render      bodies -> HTTP responses, SSE streaming, transport-level faults
  context     request-level helpers (origin, faults that apply, JSON parsing)
  state       per-app state and typed keys
  results     pure builders of a finished generation's answer (choices, usage per family)
  responses   pure builders of the other bodies (SSE frames, tasks, lists, errors)
  models      pure request validation;  parsing  single-field parsers
  catalogue   the model table and the dated-snapshot rule
  tasks       the task table;  faults  fault directives;  signing  URL/policy signatures
  png         the PNG encoder;  errors  DashScope error values;  settings  `SimSettings`

See docs/simulator.md.
"""

from .app import create_sim_app
from .settings import SimSettings

__all__ = ["SimSettings", "create_sim_app"]
