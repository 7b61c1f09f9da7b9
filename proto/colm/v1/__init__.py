"""Generated modules of ``colm/v1/*.proto`` (``kv_pb2``, ``public_pb2``, ... and their ``_pb2_grpc``).

They are written by the package build (``setup.py``), never edited or committed; load them with
``colm.proto.load_proto(name)``, which checks that they match the ``.proto`` sources beside them.
"""
