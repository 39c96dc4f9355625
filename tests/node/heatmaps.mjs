// Runs an explainable ONNX file exported with heatmaps (onnxcam export --heatmaps METHOD) on onnxruntime-node:
//   node heatmaps.mjs MODEL IMAGES.f32 N,C,H,W OUT.f32
// IMAGES.f32 holds the preprocessed batch as raw little-endian float32; OUT.f32 gets the heatmaps (N x H x W),
// and stdout one JSON line with the classes explained and the heatmaps' shape.
import { readFileSync, writeFileSync } from "node:fs";
import * as ort from "onnxruntime-node";

const [model, images, dims, out] = process.argv.slice(2);
const shape = dims.split(",").map(Number);
const session = await ort.InferenceSession.create(model);
const bytes = readFileSync(images);
const pixels = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
const feeds = {
  [session.inputNames.find((name) => name !== "onnxcam_class")]: new ort.Tensor("float32", pixels, shape),
  onnxcam_class: new ort.Tensor("int64", new BigInt64Array(shape[0]).fill(-1n), [shape[0]]),
};
const result = await session.run(feeds, ["onnxcam_heatmaps", "onnxcam_selected"]);
const heatmaps = result.onnxcam_heatmaps;
writeFileSync(out, Buffer.from(heatmaps.data.buffer, heatmaps.data.byteOffset, heatmaps.data.byteLength));
console.log(JSON.stringify({ selected: Array.from(result.onnxcam_selected.data, Number), dims: heatmaps.dims }));
