# The agent's image: what a cluster's nodes pull for a session (and what a Docker target's agent
# runs). Built by `podtwin images build` right after the podtwin image, from that image's own
# files (images/agent_rootfs.py): Python and its standard library, the agent's dependencies and
# its package, iptables, and the shared libraries they load -- on an empty base.
ARG FULL=podtwin:dev
FROM ${FULL} AS full
COPY agent_rootfs.py /tmp/
RUN /opt/podtwin/bin/python /tmp/agent_rootfs.py /rootfs

FROM scratch
COPY --from=full /rootfs/ /
# No entrypoint: `python -m podtwin.agent ...` (or its rules guard, or its stdio relay).
ENV PATH=/usr/local/bin:/usr/bin:/usr/sbin PYTHONPATH=/opt/podtwin-src:/opt/podtwin/site-packages
