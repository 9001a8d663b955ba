"""Hugging Face integrations: documents from `datasets` (`data`), model → artifact in one or several processes
(`build`; compressed responses projected while they are simulated: `compressed_build`), the `transformers.Trainer`
callback (`callback`) and the attributed text-generation pipeline (`pipeline`)."""
