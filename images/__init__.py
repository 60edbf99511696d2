"""The Dockerfiles, shipped in the wheel as package data so `podtwin images build` works from an
installed package (``importlib.resources.files("podtwin.images")``)."""
