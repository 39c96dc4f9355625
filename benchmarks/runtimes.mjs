// onnxruntime-web's WebAssembly build in Node, for benchmarks/runtimes.py:
//   node runtimes.mjs ORT_MODULE PLAIN.onnx EXPLAINED.onnx IMAGES.f32 N,C,H,W REPEATS BUDGET_S THREADS
// Times the plain file's run and the explainable file's heatmaps run in turn, round by round (two warm-up rounds,
// 3 to REPEATS rounds, about BUDGET_S seconds), and prints one JSON line of seconds per call:
// {"plain": [...], "gradcam": [...]}.
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

const [module, plainPath, explainedPath, images, dims, repeats, budget, threads] = process.argv.slice(2);
const ort = await import(pathToFileURL(module).href);
ort.env.wasm.numThreads = Number(threads);
const shape = dims.split(",").map(Number);
const bytes = readFileSync(images);
const pixels = new ort.Tensor("float32", new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4), shape);

const options = { executionProviders: ["wasm"] };
const plain = await ort.InferenceSession.create(plainPath, options);
const explained = await ort.InferenceSession.create(explainedPath, options);
const image = explained.inputNames.find((name) => name !== "onnxcam_class");
const runs = {
  plain: () => plain.run({ [plain.inputNames[0]]: pixels }),
  gradcam: () => explained.run({
    [image]: pixels,
    onnxcam_class: new ort.Tensor("int64", new BigInt64Array(shape[0]).fill(-1n), [shape[0]]),
  }, ["onnxcam_heatmaps"]),
};

for (let round = 0; round < 2; round++) for (const run of Object.values(runs)) await run();
const times = Object.fromEntries(Object.keys(runs).map((name) => [name, []]));
const start = performance.now();
for (let round = 0; round < Number(repeats) && (round < 3 || performance.now() - start < 1000 * Number(budget)); round++) {
  for (const [name, run] of Object.entries(runs)) {
    const begin = performance.now();
    await run();
    times[name].push((performance.now() - begin) / 1000);
  }
}
console.log(JSON.stringify(times));
