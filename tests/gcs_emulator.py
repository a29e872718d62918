"""`python tests/gcs_emulator.py start ...`: gcp-storage-emulator plus two GCS behaviours.

Each emulates what real Cloud Storage does and the package leaves out; everything else is
the package unchanged.

- The generation header. Cloud Storage sends `x-goog-generation` with every object
  download; tensorstore needs it to update an OCDBT manifest (orbax writes every array of
  a checkpoint into one), failing with "Malformed StorageGeneration" without it. It is
  added from the emulator's own object record.
- Exclusive create. An upload with `ifGenerationMatch=0` must fail with 412 Precondition
  Failed if the object exists (the run lock relies on it, `paths.create_exclusive`); the
  package ignores the precondition. It is checked on every insert: media, multipart, and
  each request of a resumable upload (gcsfs POSTs the chunks to the URL the upload started
  with, which carries the precondition). Other generation preconditions stay ignored.
"""
import http
import sys

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download
_insert = objects.insert


def _download_with_generation(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
  except Exception:  # pylint: disable=broad-except  (the 404 is already in the response)
    return
  response['x-goog-generation'] = str(obj.get('generation') or '')
  response['x-goog-metageneration'] = str(obj.get('metageneration') or '1')


def _insert_if_absent(request, response, storage, *args, **kwargs):
  """insert, answering 412 for ifGenerationMatch=0 on an object that exists."""
  bucket = request.params['bucket_name']
  name = request.query.get('name', [None])[0]
  if name is None and isinstance(request.data, dict):  # multipart {'meta': …}; resumable
    name = request.data.get('meta', request.data).get('name')
  if request.query.get('ifGenerationMatch', [None])[0] == '0' and name:
    try:
      storage.get_file_obj(bucket, name)
    except NotFound:
      pass
    else:
      response.status = http.HTTPStatus.PRECONDITION_FAILED
      response.json({'error': {'code': 412, 'message': 'At least one of the pre-conditions '
                               'you specified did not hold.'}})
      return None
  return _insert(request, response, storage, *args, **kwargs)


# Before the server module is imported: its route table takes these functions then.
objects.download = _download_with_generation
objects.insert = _insert_if_absent

if __name__ == '__main__':
  from gcp_storage_emulator import __main__ as emulator  # pylint: disable=g-import-not-at-top
  sys.exit(emulator.main(sys.argv[1:]))
