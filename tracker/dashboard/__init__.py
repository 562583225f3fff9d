"""The operator's dashboard: server-rendered pages over the store, signed in with `inflight users add` accounts."""
