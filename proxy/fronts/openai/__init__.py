"""The OpenAI-compatible images API (`/v1`): translation, errors, handlers."""
