"""The Kubernetes runtime: revisions as Deployments, traffic as Services (issue 13).

``options`` holds what ``branchyard up --runtime kubernetes`` was told; the rendering of
objects, the runtime and the traffic layer build on it. docs/kubernetes.md has the
mapping from branchyard's words to Kubernetes objects.
"""
