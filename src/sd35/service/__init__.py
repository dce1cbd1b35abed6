"""The OpenAI-compatible image service: `sd35 serve`.

app.py builds the FastAPI app (auth, errors, metrics), routes.py holds the endpoints, worker.py the one
GPU worker, schemas.py the request/response bodies, notify.py systemd's notify protocol and server.py
the process lifecycle (uvicorn, preflight checks, watchdog, SIGTERM drain).
"""
