"""The demo behind `hf-fwdattr demo`: tiny models, a locally trained tokenizer and a corpus of invented facts
(`toy`), and the end-to-end runs (`run`). Not imported by the library itself."""
