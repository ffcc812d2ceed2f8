#!/usr/bin/env python3
"""Print the running server's keys, or renew them. (gpt2ops.keys; run it with the project environment: .venv/bin/python scripts/keys.py --help)."""

from gpt2ops.keys import main

raise SystemExit(main())
