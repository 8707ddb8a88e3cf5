"""Walrus: the S3 service (DESIGN.md section 2), built on the replicated store and the bus.

- `euca_runtime.walrus.blobs`: object bytes on local disk (staging, checksums, install, reads);
- `euca_runtime.walrus.model`: the replicated metadata (buckets, objects, blobs, multipart
  uploads and parts), the ``walrus`` store component and its op appliers;
- `euca_runtime.walrus.s3`: pure S3 semantics (bucket names, ETags, ranges, listings, XML);
- `euca_runtime.walrus.http`: the S3 REST front end (aiohttp) on every hosting process;
- `euca_runtime.services.walrus`: the component (bus handlers on the ENABLED instance and the
  byte replication between instances).
"""
