"""The reference endpoint: bare gunicorn + Flask parsing the same webhook body, nothing else.

    gunicorn -k gthread -w 2 --threads 16 'bench.bare_app:app'
"""
import json
import uuid

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.post("/webhook/evolution/<instance_name>")
def webhook(instance_name: str):
    """Parse and minimally validate the envelope, answer 202 like the service does."""
    body = json.loads(request.get_data(cache=False))
    key = body["data"]["key"]
    if not isinstance(key.get("id"), str) or not isinstance(key.get("remoteJid"), str):
        return jsonify(error="malformed"), 400
    return jsonify(status="accepted", trace_id=str(uuid.uuid4()), instance=instance_name), 202


@app.get("/health")
def health():
    """For wait_http."""
    return jsonify(status="ok")
