// Drives a running routellm server with the official OpenAI Node SDK (`npm ci --prefix tests/sdk`).
//
// Usage: node openai_client.mjs BASE_URL MODE, MODE being `mock` (both models behind the test's
// mock upstream) or `echo` (the built-in offline models). Exits non-zero on any failure.
// The Node SDK has its own HTTP stack (fetch) and its own SSE parser, so it checks the wire
// format independently of the Python SDK's httpx and parser.
import OpenAI from 'openai';

const [baseURL, mode] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: 'sk-client', maxRetries: 0 });
const messages = [{ role: 'user', content: 'What is the capital of France?' }];

function expect(condition, what) {
  if (!condition) {
    throw new Error(`check failed: ${typeof what === 'string' ? what : JSON.stringify(what)}`);
  }
}

/** Awaits `promise`, which must reject with an error of class `errorClass`; returns the error. */
async function rejects(promise, errorClass, what) {
  try {
    await promise;
  } catch (error) {
    expect(error instanceof errorClass, `${what}: ${error?.constructor?.name}: ${error?.message}`);
    return error;
  }
  throw new Error(`${what}: no error`);
}

async function streamText(model, extra = {}) {
  const stream = await client.chat.completions.create({ model, messages, stream: true, ...extra });
  const pieces = [];
  const models = new Set();
  for await (const chunk of stream) {
    models.add(chunk.model);
    const content = chunk.choices[0]?.delta?.content;
    if (content) pieces.push(content);
  }
  return { text: pieces.join(''), models: [...models] };
}

async function collect(stream) {
  const events = [];
  for await (const event of stream) events.push(event);
  return events;
}

if (mode === 'mock') {
  const { data: completion, response } = await client.chat.completions
    .create({ model: 'router-random-0', messages })
    .withResponse();
  expect(response.headers.get('x-routellm-tier') === 'strong', Object.fromEntries(response.headers));
  expect(response.headers.get('x-routellm-model') === 'openai/gpt-4o', Object.fromEntries(response.headers));
  expect(completion.model === 'gpt-4o', completion.model);
  expect(completion.choices[0].message.content === 'answer from mock', completion);

  const streamed = await streamText('router-random-1');
  expect(streamed.text === 'from mock done', streamed.text);
  expect(streamed.models.length === 1 && streamed.models[0] === 'llama3-8b', streamed.models);

  const tools = [{
    type: 'function',
    function: {
      name: 'lookup',
      parameters: { type: 'object', properties: { q: { type: 'string' } }, required: ['q'] },
    },
  }];
  const schema = { type: 'json_schema', json_schema: { name: 'a', schema: { type: 'object' }, strict: true } };
  const withTools = await client.chat.completions.create(
    {
      model: 'router-random-0.0', messages, tools, tool_choice: 'auto', response_format: schema,
      mock: 'ok', seed_marker: 42,
    },
    { headers: { 'X-Request-Id': 'sdk-trace-1' } },
  );
  expect(withTools.choices[0].message.content === 'answer from mock', withTools);

  let error = await rejects(
    client.chat.completions.create({ model: 'router-random-2', messages }),
    OpenAI.BadRequestError, 'a threshold above 1',
  );
  expect(error.status === 400 && error.message.includes('outside [0, 1]'), error.message);
  error = await rejects(
    client.chat.completions.create({ model: 'router-nope-0.5', messages }),
    OpenAI.BadRequestError, 'an unknown router',
  );
  expect(error.message.includes('Available routers: random'), error.message);
  error = await rejects(
    client.chat.completions.create({ model: 'gpt-5-imaginary', messages }),
    OpenAI.NotFoundError, 'an unknown model',
  );
  expect(error.code === 'model_not_found', error.code);
  error = await rejects(
    client.chat.completions.create({ model: 'router-random-0', messages, mock: 'rate_limited' }),
    OpenAI.RateLimitError, "the upstream's 429",
  );
  expect(error.code === 'rate_limit_exceeded', error.code);

  error = await rejects(streamText('router-random-0', { mock: 'break_soon' }), OpenAI.APIError, 'a broken stream');
  expect(error.message.includes('stream broke'), error.message);
  // An upstream that closes its stream cleanly before the end must not look like a whole answer.
  error = await rejects(streamText('router-random-0', { mock: 'truncated' }), OpenAI.APIError, 'a cut stream');
  expect(error.message.includes('closed before its final event'), error.message);

  const raw = await client.responses
    .create({ model: 'router-random-0', input: 'What is the capital of France?', instructions: 'be brief' })
    .withResponse();
  expect(raw.response.headers.get('x-routellm-tier') === 'strong', Object.fromEntries(raw.response.headers));
  expect(raw.data.output_text === 'response from mock', raw.data);
  const events = await collect(await client.responses.create({
    model: 'router-random-1', input: [{ role: 'user', content: 'hi' }], stream: true,
  }));
  expect(
    events.map((event) => event.type).join() === 'response.output_text.delta,response.completed',
    events.map((event) => event.type),
  );
  expect(events.at(-1).response.usage.output_tokens === 3, events.at(-1));
  for (const [mock, message] of [['break_soon', 'stream broke'], ['truncated', 'closed before its final event']]) {
    const cut = await collect(await client.responses.create({ model: 'router-random-0', input: 'hi', stream: true, mock }));
    expect(cut.at(-1).type === 'error' && cut.at(-1).message.includes(message), cut.at(-1));
  }

  const legacy = await client.completions
    .create({ model: 'router-random-0', prompt: 'Once upon a time', max_tokens: 5 })
    .withResponse();
  expect(legacy.response.headers.get('x-routellm-tier') === 'strong', Object.fromEntries(legacy.response.headers));
  expect(legacy.data.choices[0].text === 'completion from mock', legacy.data);
  const chunks = await collect(await client.completions.create({ model: 'router-random-1', prompt: ['a', 'b'], stream: true }));
  expect(chunks.map((chunk) => chunk.choices[0].text).join('') === 'completion from mock done', chunks);
  error = await rejects(
    client.completions.create({ model: 'router-random-0', prompt: 'hi', stream: true, mock: 'break_soon' }).then(collect),
    OpenAI.APIError, 'a broken completions stream',
  );
  expect(error.message.includes('stream broke'), error.message);

  const ids = [];
  for await (const model of client.models.list()) ids.push(model.id);
  expect(ids.includes('router-random-0.5') && ids.includes('openai/gpt-4o'), ids);
  expect((await client.models.retrieve('router-random-0.3')).id === 'router-random-0.3', 'retrieve a router');
  expect((await client.models.retrieve('openai/gpt-4o')).owned_by === 'openai', 'retrieve a model');
  error = await rejects(client.models.retrieve('gpt-5-imaginary'), OpenAI.NotFoundError, 'an unknown model');
  expect(error.code === 'model_not_found', error.code);

  // A client hard-coded to a model name is routed when the server makes that name an alias.
  const aliased = await client.chat.completions.create({ model: 'gpt-4', messages }).withResponse();
  expect(aliased.response.headers.get('x-routellm-router') === 'random', Object.fromEntries(aliased.response.headers));
  expect(aliased.response.headers.get('x-routellm-tier') === 'weak', Object.fromEntries(aliased.response.headers));
  expect(aliased.data.model === 'llama3-8b', aliased.data.model);
  expect((await client.models.retrieve('gpt-4')).alias_for === 'router-random-1', 'retrieve an alias');
  // Embeddings are no routed endpoint: the config passes them through to the strong model.
  const embedding = await client.embeddings.create({ model: 'text-embedding-3-small', input: 'Hello', encoding_format: 'float' });
  expect(embedding.data[0].embedding[1] === -0.5 && embedding.usage.prompt_tokens === 8, JSON.stringify(embedding));
} else if (mode === 'echo') {
  const completion = await client.chat.completions.create({ model: 'router-random-0', messages });
  const content = completion.choices[0].message.content;
  expect(content.includes('echo/gpt-4o') && content.includes('capital of France'), content);
  expect(completion.usage.total_tokens > 0, completion.usage);
  const streamed = await streamText('router-random-1', { stream_options: { include_usage: true } });
  expect(streamed.text.includes('echo/mixtral') && streamed.text.includes('capital of France'), streamed.text);
  expect(streamed.models.length === 1 && streamed.models[0] === 'mixtral', streamed.models);

  const legacy = await client.completions.create({ model: 'router-random-1', prompt: 'What is the capital of France?' });
  expect(legacy.choices[0].text.includes('echo/mixtral') && legacy.usage.total_tokens > 0, legacy);
  const chunks = await collect(await client.completions.create({
    model: 'router-random-0', prompt: 'What is the capital of France?', stream: true,
    stream_options: { include_usage: true },
  }));
  expect(chunks.filter((chunk) => chunk.choices.length).map((chunk) => chunk.choices[0].text).join('')
    .includes('echo/gpt-4o'), chunks);
  expect(chunks.at(-1).usage.completion_tokens > 0, chunks.at(-1));

  const response = await client.responses.create({ model: 'router-random-0', input: 'What is the capital of France?' });
  expect(response.output_text.includes('echo/gpt-4o'), response);
  expect(response.usage.total_tokens > 0, response.usage);
  // The SDK's streaming helper rebuilds the response from the events, so it checks their order and shape.
  const stream = client.responses.stream({
    model: 'router-random-1', input: [{ role: 'user', content: 'What is the capital of France?' }],
  });
  let deltas = '';
  for await (const event of stream) {
    if (event.type === 'response.output_text.delta') deltas += event.delta;
  }
  const final = await stream.finalResponse();
  expect(deltas === final.output_text && deltas.includes('echo/mixtral'), [deltas, final.output_text]);
  expect(final.usage.output_tokens > 0, final.usage);
  // The chat streaming helper accumulates deltas into a message the same way.
  const runner = client.chat.completions.stream({ model: 'router-random-0', messages });
  const message = await runner.finalMessage();
  expect(message.role === 'assistant' && message.content.includes('echo/gpt-4o'), message);
} else {
  throw new Error(`unknown mode ${mode}`);
}
console.log('node sdk checks passed');
