"""``podtwin compose``: a compose project with services bridged to their targets (``project``),
the project rewritten for it (``generate``), and compose itself (``tool``)."""
