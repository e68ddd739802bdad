#!/usr/bin/env node
'use strict';
// Stream a completion from tokenstream and print it as JSON lines:
//   {"type":"delta","text":...,"token_ids":[...]}                  one per streamed message
//   {"type":"summary","text":...,"token_ids":[...],"finish_reason":"MAX_TOKENS","usage":{...},...}   at the end
//
// usage: node generate.js [TARGET] PROMPT [--max-new-tokens N] [--temperature T] [--seed S] [--timeout SECONDS]
//                         [--request-id ID] [--token TOKEN] [--ca ca.pem [--cert c.pem --key k.pem]]
// TARGET defaults to 127.0.0.1:50051. Exit status: 0 on success, 1 when the call fails (status name on stderr),
// 2 on bad usage, 3 when the stream ended with FINISH_REASON_ERROR or _CANCELLED.

const { parseArgs } = require('node:util');
const { callMetadata, createClient, grpc } = require('./client');

function usage(message) {
  if (message) process.stderr.write(`error: ${message}\n`);
  process.stderr.write('usage: node generate.js [TARGET] PROMPT [--max-new-tokens N] [--temperature T] [--seed S] ' +
    '[--timeout SECONDS] [--request-id ID] [--token TOKEN] [--ca FILE] [--cert FILE --key FILE]\n');
  process.exit(2);
}

let parsed;
try {
  parsed = parseArgs({
    allowPositionals: true,
    options: {
      'max-new-tokens': { type: 'string' },
      temperature: { type: 'string' },
      seed: { type: 'string' },
      timeout: { type: 'string', default: '60' },
      'request-id': { type: 'string' },
      token: { type: 'string', default: process.env.TOKENSTREAM_TOKEN },
      ca: { type: 'string' },
      cert: { type: 'string' },
      key: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
} catch (err) {
  usage(err.message);
}
const { values, positionals } = parsed;
if (values.help || positionals.length < 1 || positionals.length > 2) usage();
const [target, prompt] = positionals.length === 2 ? positionals : ['127.0.0.1:50051', positionals[0]];

const request = { prompt, sampling: {}, stopping: {} };
if (values['max-new-tokens'] !== undefined) request.stopping.maxNewTokens = Number(values['max-new-tokens']);
if (values.temperature !== undefined) request.sampling.temperature = Number(values.temperature);
if (values.seed !== undefined) request.sampling.seed = values.seed;

const client = createClient(target, { ca: values.ca, cert: values.cert, key: values.key });
const metadata = callMetadata({ requestId: values['request-id'], token: values.token });
const deadline = new Date(Date.now() + Number(values.timeout) * 1000);
const call = client.generate(request, metadata, { deadline });
process.on('SIGINT', () => call.cancel()); // the server stops decoding for a cancelled call

const write = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
const reason = (name) => name.replace(/^FINISH_REASON_/, '');
const texts = [];
const tokenIds = [];
let final = null;

call.on('data', (msg) => {
  const ids = msg.tokens.map((t) => t.id);
  texts.push(msg.text);
  tokenIds.push(...ids);
  write({ type: 'delta', text: msg.text, token_ids: ids });
  if (msg.finishReason !== 'FINISH_REASON_UNSPECIFIED') final = msg;
});

call.on('error', (err) => {
  const name = grpc.status[err.code] || String(err.code);
  process.stderr.write(`error: ${name}: ${err.details}\n`);
  process.exitCode = 1;
  client.close();
});

call.on('end', () => {
  client.close();
  if (process.exitCode) return;
  if (final === null) {
    process.stderr.write('error: the stream ended without a final message\n');
    process.exitCode = 1;
    return;
  }
  write({
    type: 'summary',
    text: texts.join(''),
    token_ids: tokenIds,
    finish_reason: reason(final.finishReason),
    usage: { prompt_tokens: final.usage.promptTokens, completion_tokens: final.usage.completionTokens },
    timings: {
      queue_ms: final.timings.queueMs,
      time_to_first_token_ms: final.timings.timeToFirstTokenMs,
      decode_ms: final.timings.decodeMs,
      total_ms: final.timings.totalMs,
    },
    seed: final.seed === undefined || final.seed === null ? null : final.seed,
    stop_sequence: final.stopSequence || null,
    request_id: metadata.get('x-request-id')[0],
  });
  if (final.finishReason === 'FINISH_REASON_ERROR' || final.finishReason === 'FINISH_REASON_CANCELLED') {
    process.stderr.write(`error: the stream ended with ${reason(final.finishReason)}: ${final.errorMessage}\n`);
    process.exitCode = 3;
  }
});
