'use strict';
// A GenerationService client for Node.js, built at run time from the repository's proto file with
// @grpc/proto-loader (no generated code).

const path = require('node:path');
const crypto = require('node:crypto');
const fs = require('node:fs');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const PROTO_FILE = 'tokenstream/v1/generation.proto';

// Keepalive for long-lived streams: ping every 30 s (the server accepts pings down to every 10 s), give up on a
// peer that does not answer within 10 s.
const CHANNEL_OPTIONS = {
  'grpc.keepalive_time_ms': 30000,
  'grpc.keepalive_timeout_ms': 10000,
  'grpc.keepalive_permit_without_calls': 1,
  'grpc.http2.max_pings_without_data': 0,
};
const ROUND_ROBIN_SERVICE_CONFIG = JSON.stringify({ loadBalancingConfig: [{ round_robin: {} }] });

function loadPackage() {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [PROTO_ROOT],
    keepCase: false, // fields in lowerCamelCase: finishReason, maxNewTokens, ...
    longs: String, // uint64 seed as a decimal string
    enums: String, // enum values by name: "FINISH_REASON_MAX_TOKENS"
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).tokenstream.v1;
}

// createClient(target, {ca, cert, key}): insecure unless a CA (or client certificate) is given.
function createClient(target, tls = {}) {
  const { GenerationService } = loadPackage();
  let credentials = grpc.credentials.createInsecure();
  if (tls.ca || tls.cert) {
    const read = (file) => (file ? fs.readFileSync(file) : null);
    credentials = grpc.credentials.createSsl(read(tls.ca), read(tls.key), read(tls.cert));
  }
  const options = { ...CHANNEL_OPTIONS };
  if (target.startsWith('dns:')) options['grpc.service_config'] = ROUND_ROBIN_SERVICE_CONFIG;
  return new GenerationService(target, credentials, options);
}

function callMetadata({ requestId, token } = {}) {
  const metadata = new grpc.Metadata();
  metadata.set('x-request-id', requestId || crypto.randomUUID());
  if (token) metadata.set('authorization', `Bearer ${token}`);
  return metadata;
}

module.exports = { CHANNEL_OPTIONS, PROTO_FILE, PROTO_ROOT, callMetadata, createClient, grpc, loadPackage };
