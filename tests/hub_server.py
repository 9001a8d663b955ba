"""A local stand-in for the Hugging Face Hub's HTTP API, recording what huggingface_hub sends.

It answers the endpoints `HfApi.create_repo` and `HfApi.upload_folder` use (repo creation, YAML
validation, pre-upload, commit), with files inlined in the commit (upload mode "regular"), so a test
can assert exactly which files and which model card were committed, without any network.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class RecordingHub:
    """Start with `with RecordingHub() as hub:`; point huggingface_hub at `hub.endpoint`."""

    def __init__(self):
        self.requests: list[tuple[str, str]] = []
        self.repos: list[dict] = []
        self.commits: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _reply(self, payload, status=200):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                hub.requests.append(("GET", self.path))
                self._reply({"error": "not found"}, 404)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                hub.requests.append(("POST", self.path))
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    data = json.loads(body)
                    hub.repos.append(data)
                    repo_id = f"{data.get('organization') or 'user'}/{data['name']}" if "/" not in data["name"] else data["name"]
                    return self._reply({"url": f"{hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})
                if path == "/api/validate-yaml":
                    return self._reply({"errors": [], "warnings": []})
                if "/preupload/" in path:
                    files = json.loads(body)["files"]
                    return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
                if "/commit/" in path:
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    header = next(l["value"] for l in lines if l["key"] == "header")
                    files = {l["value"]["path"]: base64.b64decode(l["value"]["content"]) for l in lines if l["key"] == "file"}
                    repo = path.split("/api/models/")[1].split("/commit/")[0]
                    hub.commits.append({"repo": repo, "summary": header.get("summary"), "files": files})
                    oid = "a" * 40
                    return self._reply({"success": True, "commitOid": oid, "commitUrl": f"{hub.endpoint}/{repo}/commit/{oid}", "hookOutput": ""})
                return self._reply({"error": f"unexpected {path}"}, 404)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "RecordingHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
