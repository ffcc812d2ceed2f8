#!/usr/bin/env python3
"""Send a prompt to a registered model and print the answer. (gpt2ops.query; run it with the project environment: .venv/bin/python scripts/query.py --help)."""

from gpt2ops.query import main

raise SystemExit(main())
