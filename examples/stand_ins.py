"""Stand-ins the examples use in place of things that need a network: a "pretrained" model and the Hub.

- `pretrained_model()`: a tiny Llama and tokenizer, pre-trained from scratch on texts about invented places
  (in real use: ``AutoModelForCausalLM.from_pretrained("your/base-model")``); built once, then loaded.
- `fine_tuning_documents()`: the documents to fine-tune on — invented facts, each stated in one document,
  from five sources — as a `datasets.Dataset` with ``document_id``, ``source`` and ``input_ids``.
- `LocalHub`: a small HTTP server that speaks the part of the Hub API `push_to_hub` and `from_pretrained`
  use (create repo, commit, repo info, file tree, file download), files kept in memory.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CORPUS = dict(n_entities=8, relations_per_entity=2, n_filler=8, n_distractors=4, pretraining_entities=16)
BASE_DIR = Path("runs/examples/base")


def collate(tokenizer):
    """A Trainer data collator for rows with ``input_ids`` (other columns, e.g. ``document_id``, are dropped)."""
    from hf_fwdattr import CausalLMTask

    task = CausalLMTask(pad_token_id=tokenizer.pad_token_id)
    return lambda rows: task.collate([{"input_ids": row["input_ids"]} for row in rows])


def pretrained_model():
    """(model, tokenizer): the stand-in for a pretrained base model."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from hf_fwdattr.demo.toy import fact_corpus, tiny_llama, train_tokenizer

    if not (BASE_DIR / "config.json").is_file():
        corpus = fact_corpus(**CORPUS)
        tokenizer = train_tokenizer(corpus["pretraining"] + [d["text"] for d in corpus["documents"]], vocab_size=500)
        model = tiny_llama(len(tokenizer), hidden_size=64, layers=2, heads=4).train()
        texts = Dataset.from_list([{"input_ids": tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]} for t in corpus["pretraining"]])
        args = TrainingArguments(output_dir=str(BASE_DIR / "run"), num_train_epochs=40, learning_rate=3e-3, per_device_train_batch_size=16,
                                 save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=10_000, seed=0)
        Trainer(model=model, args=args, train_dataset=texts, data_collator=collate(tokenizer)).train()
        model.save_pretrained(BASE_DIR)
        tokenizer.save_pretrained(BASE_DIR)
    return AutoModelForCausalLM.from_pretrained(BASE_DIR), AutoTokenizer.from_pretrained(BASE_DIR)


def fine_tuning_documents(tokenizer):
    """(dataset, questions): the fine-tuning documents, and a question (prompt, answer, true document) per fact."""
    from datasets import Dataset

    from hf_fwdattr.demo.toy import fact_corpus

    corpus = fact_corpus(**CORPUS)
    rows = [{"document_id": d["document_id"], "source": d["source"], "input_ids": tokenizer(d["text"])["input_ids"] + [tokenizer.eos_token_id]}
            for d in corpus["documents"]]
    return Dataset.from_list(rows), corpus["questions"]


class LocalHub:
    """``with LocalHub() as hub:`` then point huggingface_hub at ``hub.endpoint`` (``HF_ENDPOINT``) before importing it."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status=200, payload=None, body=None, headers=()):
                data = json.dumps(payload).encode() if payload is not None else (body or b"")
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if payload is not None else "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers:
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    data = json.loads(body)
                    repo = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
                    hub.repos.setdefault(repo, {})
                    return self._send(payload={"url": f"{hub.endpoint}/{repo}", "name": repo, "id": repo})
                if path == "/api/validate-yaml":
                    return self._send(payload={"errors": [], "warnings": []})
                if "/preupload/" in path:
                    files = json.loads(body)["files"]
                    return self._send(payload={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
                if "/commit/" in path:
                    repo = path.split("/api/models/")[1].split("/commit/")[0]
                    for line in body.decode().splitlines():
                        entry = json.loads(line) if line.strip() else {}
                        if entry.get("key") == "file":
                            hub.repos[repo][entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
                    oid = hub.commit(repo)
                    return self._send(payload={"success": True, "commitOid": oid, "commitUrl": f"{hub.endpoint}/{repo}/commit/{oid}"})
                return self._send(404, {"error": f"unexpected POST {path}"})

            def do_GET(self):
                path = self.path.split("?")[0]
                if path.startswith("/api/models/"):
                    rest = path[len("/api/models/"):]
                    repo = "/".join(rest.split("/")[:2])
                    files = hub.repos.get(repo)
                    if files is None:
                        return self._send(404, {"error": "Repository not found"}, headers=[("X-Error-Code", "RepoNotFound")])
                    if "/revision/" in rest:
                        return self._send(payload={"id": repo, "sha": hub.commit(repo), "siblings": [{"rfilename": f} for f in sorted(files)]})
                    if "/tree/" in rest:
                        return self._send(payload=[{"type": "file", "path": f, "size": len(c), "oid": hashlib.sha1(c).hexdigest()}
                                                   for f, c in sorted(files.items())])
                if "/resolve/" in path:
                    repo, _, rest = path.lstrip("/").partition("/resolve/")
                    filename = rest.split("/", 1)[1]
                    content = hub.repos.get(repo, {}).get(filename)
                    if content is None:
                        return self._send(404, {"error": "Entry not found"}, headers=[("X-Error-Code", "EntryNotFound")])
                    etag = hashlib.sha1(content).hexdigest()
                    return self._send(body=content, headers=[("X-Repo-Commit", hub.commit(repo)), ("ETag", f'"{etag}"')])
                return self._send(404, {"error": f"unexpected GET {path}"})

            do_HEAD = do_GET

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def commit(self, repo: str) -> str:
        """The repo's revision: a digest of its files (a commit changes it)."""
        digest = hashlib.sha1()
        for name, content in sorted(self.repos[repo].items()):
            digest.update(name.encode() + hashlib.sha1(content).digest())
        return digest.hexdigest()

    def __enter__(self) -> "LocalHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
