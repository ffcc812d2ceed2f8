#!/usr/bin/env python3
"""Predict a worker's GPU memory, part by part, and whether N workers fit on one GPU, before deploying. (gpt2ops.plan_memory; run it with the project environment: .venv/bin/python scripts/plan_memory.py --help)."""

from gpt2ops.plan_memory import main

raise SystemExit(main())
