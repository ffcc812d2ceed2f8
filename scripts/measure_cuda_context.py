#!/usr/bin/env python3
"""Measure the CUDA context of a fresh PyTorch process, with lazy and with eager kernel loading. (gpt2ops.measure_cuda_context; run it with the project environment: .venv/bin/python scripts/measure_cuda_context.py --help)."""

from gpt2ops.measure_cuda_context import main

raise SystemExit(main())
