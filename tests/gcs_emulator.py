"""`python tests/gcs_emulator.py start ...`: gcp-storage-emulator, plus the generation header.

Cloud Storage sends `x-goog-generation` with every object download; gcp-storage-emulator
leaves it out, and tensorstore needs it to update an OCDBT manifest (orbax writes every
array of a checkpoint into one), failing with "Malformed StorageGeneration". This adds the
header from the emulator's own object record; everything else is the package unchanged.
"""
import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
  except Exception:  # pylint: disable=broad-except  (the 404 is already in the response)
    return
  response['x-goog-generation'] = str(obj.get('generation') or '')
  response['x-goog-metageneration'] = str(obj.get('metageneration') or '1')


# Before the server module is imported: its route table takes objects.download then.
objects.download = _download_with_generation

if __name__ == '__main__':
  from gcp_storage_emulator import __main__ as emulator  # pylint: disable=g-import-not-at-top
  sys.exit(emulator.main(sys.argv[1:]))
