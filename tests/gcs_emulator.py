"""A Google Cloud Storage emulator on localhost for tests of ``gs://`` workdirs (gcp-storage-emulator).

``python tests/gcs_emulator.py PORT BUCKET`` serves an in-memory store with BUCKET created. Two gaps of the
emulator against real GCS are closed here, both needed by TensorStore (Orbax's array writer): media
downloads carry the object's ``x-goog-generation``/``x-goog-metageneration`` headers (without them
TensorStore sees generation 0 and its next conditional read fails as "Malformed"), and a download with
``ifGenerationNotMatch`` equal to the current generation answers 304 Not Modified.

:func:`environment` gives the variables that point gcsfs (epath's backend), TensorStore and JAX at it.
"""

from __future__ import annotations

import logging
import sys
from http import HTTPStatus


def environment(url: str) -> dict[str, str]:
    return {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs
        "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credentials lookup
        # gcsfs probes a bucket's kind over gRPC first, which the emulator never answers (60 s per call).
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "TENSORSTORE_GCS_HTTP_URL": url,  # TensorStore's gcs driver
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # TensorStore: a fixed bearer token
    }


def _serve(port: int, bucket: str) -> None:
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    plain_download = objects.download

    def download(request, response, storage, *args, **kwargs):
        try:
            found = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            found = None
        if found is not None:
            generation = str(found.get("generation", "1"))
            response["x-goog-generation"] = generation
            response["x-goog-metageneration"] = str(found.get("metageneration", "1"))
            if request.query.get("ifGenerationNotMatch", [None])[0] == generation:
                response.status = HTTPStatus.NOT_MODIFIED
                return None
        return plain_download(request, response, storage, *args, **kwargs)

    objects.download = download
    from gcp_storage_emulator.server import create_server  # After the patch: it copies the handler table.

    logging.basicConfig(level=logging.CRITICAL)
    create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2])
