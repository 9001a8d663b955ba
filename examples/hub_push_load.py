"""Push an influence artifact to the Hub and load it back — here a local stand-in for the Hub.

    python examples/hub_push_load.py [INFLUENCE_DIR MODEL_DIR]

By default it pushes what `lora_callback_pipeline.py` leaves in runs/examples/lora (run that first). The
stand-in (`stand_ins.LocalHub`) answers the same HTTP calls as huggingface.co, so the calls below are the
ones you would make against the real Hub: only HF_ENDPOINT differs.
"""

import os
import sys
import tempfile

from stand_ins import LocalHub

influence_dir, model_dir = sys.argv[1:3] if len(sys.argv) == 3 else ("runs/examples/lora/influence", "runs/examples/lora/model")
with LocalHub() as hub, tempfile.TemporaryDirectory() as cache:
    os.environ.update(HF_ENDPOINT=hub.endpoint, HF_HOME=cache, HF_TOKEN="hf_local_stand_in")  # before huggingface_hub is imported
    os.environ.pop("HF_HUB_OFFLINE", None)
    from transformers import pipeline

    import hf_fwdattr  # noqa: F401  (registers the "attributed-text-generation" pipeline)
    from hf_fwdattr import InfluenceArtifact

    url = InfluenceArtifact.from_pretrained(influence_dir).push_to_hub("me/facts-influence", commit_message="Add influence artifact")
    print(f"Pushed: {url}\nFiles in the repo: {sorted(hub.repos['me/facts-influence'])}")

    artifact = InfluenceArtifact.from_pretrained("me/facts-influence")  # downloaded into the Hub cache, then memory-mapped
    print(f"Loaded back from {artifact.path}: {artifact}")
    pipe = pipeline("attributed-text-generation", model=model_dir, influence="me/facts-influence")
    (record,) = pipe("The capital of", max_new_tokens=8, do_sample=False, attribution_top_k=3)
    print(record["generated_text"], *record["attributions"], sep="\n  ")
