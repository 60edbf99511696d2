"""The sidecar: owns the app's network namespace and bridges it to the agent (``__main__``)."""

# Created in the sidecar's own filesystem once the bridge is up: a compose project's healthcheck
# (``test -e``) gates the app's service on it, as ``PODTWIN_SIDECAR_READY`` on its output does
# for ``podtwin container run``.
READY_FILE = "/run/podtwin-sidecar.ready"
