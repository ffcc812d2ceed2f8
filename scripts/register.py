#!/usr/bin/env python3
"""Register a model archive from the model store through TorchServe's management API, with the management key. (gpt2ops.register; run it with the project environment: .venv/bin/python scripts/register.py --help)."""

from gpt2ops.register import main

raise SystemExit(main())
