#!/usr/bin/env python3
"""Print the input packages for openapi-gen, run from the wrapper module's directory.

hack/update-codegen.sh feeds openapi-gen every package (outside code-generator and
sample-apiserver) with a Go file carrying a `+k8s:openapi-gen=` tag. In a git checkout it greps
the tree; here the sources are k8s.io/kubernetes and its staging modules in the module cache.
"""
import json
import os
import subprocess

SKIP = {"k8s.io/code-generator", "k8s.io/sample-apiserver"}


def modules():
    out = subprocess.run(["go", "list", "-m", "-json", "all"], capture_output=True, text=True, check=True).stdout
    dec = json.JSONDecoder()
    i = 0
    while i < len(out):
        while i < len(out) and out[i].isspace():
            i += 1
        if i >= len(out):
            break
        mod, i = dec.raw_decode(out, i)
        path = mod["Path"]
        # k8s.io/kubernetes plus the staging modules (the ones the wrapper replaces)
        if path == "k8s.io/kubernetes" or ("Replace" in mod and path.startswith("k8s.io/")):
            d = (mod.get("Replace") or {}).get("Dir") or mod.get("Dir")
            if d and path not in SKIP:
                yield path, d


def main() -> None:
    pkgs = set()
    for path, root in modules():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in ("vendor", "testdata", "_output")]
            for f in filenames:
                if not f.endswith(".go") or f.endswith("_test.go"):
                    continue
                with open(os.path.join(dirpath, f), errors="replace") as fh:
                    if "+k8s:openapi-gen=" in fh.read():
                        rel = os.path.relpath(dirpath, root)
                        pkgs.add(path if rel == "." else f"{path}/{rel}")
                        break
    print(" ".join(sorted(pkgs)))


if __name__ == "__main__":
    main()
