"""A local GCS server for tests: PyPI's `gcp-storage-emulator` on loopback, in memory, with one
bucket. Run as `python tests/gcs_emulator.py PORT BUCKET`.

One gap is filled: the emulator's media downloads carry no `x-goog-generation` header, which real
GCS sends and tensorstore needs to read OCDBT manifests (orbax's default layout). The download
handler is wrapped to send the object's generation; nothing else is changed.
"""
import sys

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

# Imported after the patch: the server builds its routing table from the handlers at import.
from gcp_storage_emulator import server as server_lib  # pylint: disable=wrong-import-position


def main(port: int, bucket: str) -> None:
  print(f"GCS emulator on 127.0.0.1:{port}, bucket {bucket}", flush=True)
  server_lib.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
