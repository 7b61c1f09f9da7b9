"""The ``colm`` protobuf package's versions (``colm.proto.colm.v1``), laid out as the .proto sources are."""
