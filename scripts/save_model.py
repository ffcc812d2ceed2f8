#!/usr/bin/env python3
"""Save a GPT-2 for serving: fp16 safetensors, tokenizer files and generation config in one folder. (gpt2ops.save_model; run it with the project environment: .venv/bin/python scripts/save_model.py --help)."""

from gpt2ops.save_model import main

raise SystemExit(main())
