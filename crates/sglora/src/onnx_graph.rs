//! Reading weights out of an ONNX file by graph structure, for the fixed-order runtime
//! ([`crate::bert`], [`crate::cvae`]). Only what those need: initialisers, `Constant` nodes, nodes
//! by name, and int8 weights behind `DequantizeLinear`. The protobuf is decoded by tract-onnx.

use std::collections::HashMap;

use tract_onnx::pb::{NodeProto, TensorProto};
use tract_onnx::prelude::Framework;

use crate::error::{unsupported, Unsupported};
use crate::kernels::{Linear, Weights};

// ONNX TensorProto.DataType values.
const FLOAT: i32 = 1;
const INT8: i32 = 3;

/// A decoded ONNX graph, indexed for lookups.
pub(crate) struct Graph {
    inits: HashMap<String, TensorProto>,
    nodes: Vec<NodeProto>,
    by_name: HashMap<String, usize>,
    by_output: HashMap<String, usize>,
}

/// A tensor's shape and fp32 values.
pub(crate) struct F32Tensor {
    pub dims: Vec<usize>,
    pub data: Vec<f32>,
}

fn dims_of(t: &TensorProto) -> Result<Vec<usize>, Unsupported> {
    t.dims
        .iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| unsupported!("{}: negative dimension {d}", t.name))
        })
        .collect()
}

fn count(dims: &[usize], name: &str) -> Result<usize, Unsupported> {
    dims.iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| unsupported!("{name}: shape {dims:?} overflows"))
}

impl Graph {
    /// Decode ONNX bytes.
    pub fn parse(bytes: &[u8]) -> Result<Graph, Unsupported> {
        let model = tract_onnx::onnx()
            .proto_model_for_read(&mut &bytes[..])
            .map_err(|e| unsupported!("not a readable ONNX file: {e:#}"))?;
        let graph = model.graph.ok_or("the ONNX file has no graph")?;
        let inits = graph
            .initializer
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        let nodes = graph.node;
        let mut by_name = HashMap::new();
        let mut by_output = HashMap::new();
        for (i, n) in nodes.iter().enumerate() {
            if !n.name.is_empty() {
                by_name.insert(n.name.clone(), i);
            }
            for o in &n.output {
                by_output.insert(o.clone(), i);
            }
        }
        Ok(Graph {
            inits,
            nodes,
            by_name,
            by_output,
        })
    }

    /// The node called `name`, which must be an `op`.
    pub fn node(&self, name: &str, op: &str) -> Result<&NodeProto, Unsupported> {
        let n = self
            .by_name
            .get(name)
            .map(|&i| &self.nodes[i])
            .ok_or_else(|| unsupported!("no node named {name}"))?;
        if n.op_type != op {
            return Err(unsupported!("node {name} is {}, expected {op}", n.op_type));
        }
        Ok(n)
    }

    /// Names of all nodes (for structure checks).
    pub fn node_names(&self) -> impl Iterator<Item = &str> {
        self.nodes.iter().map(|n| n.name.as_str())
    }

    /// Input `i` of `node`.
    pub fn input<'a>(&self, node: &'a NodeProto, i: usize) -> Result<&'a str, Unsupported> {
        node.input
            .get(i)
            .map(String::as_str)
            .ok_or_else(|| unsupported!("node {} has no input {i}", node.name))
    }

    /// A float attribute of `node`.
    pub fn attr_f32(&self, node: &NodeProto, name: &str) -> Option<f32> {
        node.attribute.iter().find(|a| a.name == name).map(|a| a.f)
    }

    /// An integer attribute of `node`.
    pub fn attr_i64(&self, node: &NodeProto, name: &str) -> Option<i64> {
        node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
    }

    /// The tensor behind a value name: an initialiser or the output of a `Constant` node.
    fn tensor(&self, value: &str) -> Result<&TensorProto, Unsupported> {
        if let Some(t) = self.inits.get(value) {
            return Ok(t);
        }
        let n = self
            .by_output
            .get(value)
            .map(|&i| &self.nodes[i])
            .ok_or_else(|| unsupported!("no tensor called {value}"))?;
        if n.op_type != "Constant" {
            return Err(unsupported!(
                "{value} is computed by a {} node, not stored",
                n.op_type
            ));
        }
        n.attribute
            .iter()
            .find(|a| a.name == "value")
            .and_then(|a| a.t.as_ref())
            .ok_or_else(|| unsupported!("constant {value} has no tensor value"))
    }

    /// Shape and values of a stored tensor of ONNX type `want`, from `raw_data` (little-endian)
    /// or else the typed field.
    fn stored<T>(
        &self,
        value: &str,
        want: i32,
        raw: impl Fn(&[u8]) -> Vec<T>,
        typed: impl Fn(&TensorProto) -> Vec<T>,
    ) -> Result<(Vec<usize>, Vec<T>), Unsupported> {
        let t = self.tensor(value)?;
        if t.data_type != want {
            return Err(unsupported!(
                "{value} has ONNX type {}, expected {want}",
                t.data_type
            ));
        }
        let dims = dims_of(t)?;
        let n = count(&dims, value)?;
        let data = if t.raw_data.is_empty() {
            typed(t)
        } else {
            raw(&t.raw_data)
        };
        if data.len() != n {
            return Err(unsupported!(
                "{value}: {} values for shape {dims:?}",
                data.len()
            ));
        }
        Ok((dims, data))
    }

    /// fp32 values of a stored tensor.
    pub fn f32s(&self, value: &str) -> Result<F32Tensor, Unsupported> {
        let raw = |b: &[u8]| crate::le::f32s_from_le(b).collect();
        let (dims, data) = self.stored(value, FLOAT, raw, |t| t.float_data.clone())?;
        Ok(F32Tensor { dims, data })
    }

    /// A stored scalar (shape `[]` or `[1]`).
    pub fn scalar(&self, value: &str) -> Result<f32, Unsupported> {
        let t = self.f32s(value)?;
        match t.data[..] {
            [v] => Ok(v),
            _ => Err(unsupported!("{value} is not a scalar (shape {:?})", t.dims)),
        }
    }

    /// The stored scalar that `node` combines with something computed (its other input).
    pub fn const_operand(&self, node: &NodeProto) -> Result<f32, Unsupported> {
        node.input
            .iter()
            .find_map(|i| self.scalar(i).ok())
            .ok_or_else(|| unsupported!("node {} has no constant scalar operand", node.name))
    }

    fn i8s(&self, value: &str) -> Result<(Vec<usize>, Vec<i8>), Unsupported> {
        let raw = |b: &[u8]| b.iter().map(|&v| v as i8).collect();
        self.stored(value, INT8, raw, |t| {
            t.int32_data.iter().map(|&v| v as i8).collect()
        })
    }

    /// The weight matrix `[inputs, outputs]` that `MatMul` node `name` multiplies by, int8 with
    /// per-output scales (behind a symmetric `DequantizeLinear`, axis 1) or fp32, with `bias`.
    pub fn matmul(&self, name: &str, bias: Option<Vec<f32>>) -> Result<Linear, Unsupported> {
        let node = self.node(name, "MatMul")?;
        let w = self.input(node, 1)?;
        let linear = if let Some(&di) = self.by_output.get(w) {
            let dq = &self.nodes[di];
            if dq.op_type != "DequantizeLinear" {
                return Err(unsupported!("{name}: weight comes from {}", dq.op_type));
            }
            let (dims, q) = self.i8s(self.input(dq, 0)?)?;
            let scale = self.f32s(self.input(dq, 1)?)?;
            let (zdims, zero) = self.i8s(self.input(dq, 2)?)?;
            let [k, n] = dims[..] else {
                return Err(unsupported!("{name}: int8 weight of shape {dims:?}"));
            };
            if self.attr_i64(dq, "axis") != Some(1)
                || scale.dims != [n]
                || zdims != [n]
                || zero.iter().any(|&z| z != 0)
            {
                return Err(unsupported!(
                    "{name}: only symmetric per-output-channel int8 (axis 1, zero points 0) is supported"
                ));
            }
            Linear::new(
                k,
                n,
                Weights::I8 {
                    q,
                    scale: scale.data,
                },
                bias,
            )
        } else {
            let t = self.f32s(w)?;
            let [k, n] = t.dims[..] else {
                return Err(unsupported!("{name}: weight of shape {:?}", t.dims));
            };
            Linear::new(k, n, Weights::F32(t.data), bias)
        };
        linear.map_err(|e| unsupported!("{name}: {e}"))
    }

    /// The `Gemm` node `name` (`transB = 1`, `alpha = beta = 1`) as a [`Linear`].
    pub fn gemm(&self, name: &str) -> Result<Linear, Unsupported> {
        let node = self.node(name, "Gemm")?;
        let ok = |a: &str, v: f32| self.attr_f32(node, a).is_none_or(|x| x == v);
        if self.attr_i64(node, "transB") != Some(1)
            || self.attr_i64(node, "transA").is_some_and(|v| v != 0)
            || !ok("alpha", 1.0)
            || !ok("beta", 1.0)
        {
            return Err(unsupported!(
                "{name}: only Gemm with transB = 1 is supported"
            ));
        }
        let w = self.f32s(self.input(node, 1)?)?;
        let b = self.f32s(self.input(node, 2)?)?;
        let [n, k] = w.dims[..] else {
            return Err(unsupported!("{name}: weight of shape {:?}", w.dims));
        };
        // Stored [outputs, inputs]; the kernels want [inputs, outputs].
        let mut t = vec![0.0f32; k * n];
        for o in 0..n {
            for i in 0..k {
                t[i * n + o] = w.data[o * k + i];
            }
        }
        Linear::new(k, n, Weights::F32(t), Some(b.data)).map_err(|e| unsupported!("{name}: {e}"))
    }
}
