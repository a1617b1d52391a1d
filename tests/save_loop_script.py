"""Saves training states in a loop, for the kill-during-save test: `python save_loop_script.py PATH`.
Version v has every weight equal to v and `extra={"version": v}`; prints v once it is saved."""

from __future__ import annotations

import sys

import torch

import torchcallbacks as tc


def make() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 512))


if __name__ == "__main__":
    model = make()
    version = 0
    while True:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(version))
        tc.save_checkpoint(model, sys.argv[1], extra={"version": version})
        print(version, flush=True)
        version += 1
