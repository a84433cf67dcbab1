"""A local GCS server for tests: PyPI's `gcp-storage-emulator` on loopback, in memory, with one
bucket. Run as `python -m tests.support.gcs_emulator PORT BUCKET [WRITES_LOG]`.

Two gaps are filled. The emulator's media downloads carry no `x-goog-generation` header, which real
GCS sends and tensorstore needs to read OCDBT manifests (orbax's default layout): the download
handler is wrapped to send the object's generation. Its one-thread server listens with a backlog of
5 connections, so a client opening more at once (array_record's parallel record reads, tensorstore)
waits a second for each SYN resent: the backlog is raised to 128 (a prepared set's rows read in
1.4 s instead of 142 s). Nothing else is changed.

With WRITES_LOG, every object the server stores (an upload; a server-side copy would count too) is
logged there as a line `NAME<TAB>BYTES`: what tests count to measure the bytes a client moves.
"""
from http import server as http_server
import sys

from gcp_storage_emulator import storage as storage_lib
from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # pylint: disable=broad-except  (missing: the handler answers 404)
    obj = None
  if obj:
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  return _download(request, response, storage, *args, **kwargs)


objects.download = _download_with_generation
http_server.HTTPServer.request_queue_size = 128

# Imported after the patch: the server builds its routing table from the handlers at import.
from gcp_storage_emulator import server as server_lib  # pylint: disable=wrong-import-position


def _log_writes(path: str) -> None:
  create_file = storage_lib.Storage.create_file

  def create_file_logged(self, bucket_name, file_name, content, *args, **kwargs):
    result = create_file(self, bucket_name, file_name, content, *args, **kwargs)
    with open(path, "a", encoding="utf-8") as f:
      f.write(f"{bucket_name}/{file_name}\t{len(content)}\n")
    return result

  storage_lib.Storage.create_file = create_file_logged


def main(port: int, bucket: str, writes_log: str = "") -> None:
  if writes_log:
    _log_writes(writes_log)
  print(f"GCS emulator on 127.0.0.1:{port}, bucket {bucket}", flush=True)
  server_lib.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
  main(int(sys.argv[1]), *sys.argv[2:4])
