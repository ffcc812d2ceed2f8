"""The OpenAI-compatible API under `v1/`: `protocol` (fields, shapes, reading), `call` (the mapping to
`GenerationParams`, choices and chunks), `routes` (the routes and the start of a call)."""
