//! Choosing the device: `gpu` is wgpu on whatever adapter exists (software ones such as
//! lavapipe included), `cpu` the Flex CPU backend, `auto` a hardware GPU if there is one,
//! else the CPU.

use burn::tensor::Device;
#[cfg(all(feature = "gpu", feature = "cpu"))]
use burn::tensor::DeviceKind;

use crate::cpu_int::ActBits;

/// The largest buffer one kernel may bind on a device (WebGPU's
/// `maxStorageBufferBindingSize`, or less where a caller asks for less). Weights above it
/// are stored as row bands; prefill chunks and vision batches are sized under it.
///
/// It is a property of the opened device, carried as a value in a [`Placement`] into
/// every matrix, decoder and tower loaded there: two models in one process (two devices,
/// or one device under two caps) never share a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindingCap(usize);

impl BindingCap {
    /// No limit worth splitting for (the CPU).
    pub const NONE: Self = Self(usize::MAX);
    /// Smallest cap taken: a band holds at least one 4 KiB page.
    pub const FLOOR: usize = 4096;

    pub fn bytes(bytes: u64) -> Self {
        Self(usize::try_from(bytes).unwrap_or(usize::MAX).max(Self::FLOOR))
    }

    pub fn get(self) -> usize {
        self.0
    }

    /// The tighter of this cap and `bytes` (never a looser one).
    pub fn lower(self, bytes: u64) -> Self {
        Self(self.0.min(Self::bytes(bytes).0))
    }

    /// How many items of `item_bytes` fit one binding beside `fixed_bytes` (at least one):
    /// rows of a weight band, tokens of a prefill step, frames of a vision batch.
    pub fn per_binding(self, item_bytes: usize, fixed_bytes: usize) -> usize {
        (self.0.saturating_sub(fixed_bytes) / item_bytes.max(1)).max(1)
    }
}

/// Which kernels a quantised matrix's products run on wgpu.
///
/// A GPU runs a cube's units in lockstep and shares values between them cheaply; a CPU
/// behind a GPU API (lavapipe, a browser's SwiftShader) runs them as a few SIMD lanes on one
/// thread and pays for every barrier with a switch between them. On SwiftShader the
/// cooperative GEMV (32 lanes per output, a shared-memory tree: six barriers a cube) cost
/// about 70 µs a cube whatever its work, 99% of a SmolLM2 decode step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatmulKernels {
    /// [`MatmulKernels::PerUnit`] where the device is a CPU (CubeCL's wgpu runtime reports
    /// no physical card for it), else [`MatmulKernels::Cooperative`].
    #[default]
    Auto,
    /// For GPUs: 32 lanes per output meeting in a shared-memory tree (one to eight rows
    /// of activations), tiles staged in shared memory above that.
    Cooperative,
    /// For CPUs: each unit a register tile of outputs walking their whole rows, no shared
    /// memory, no barrier; each weight decoded once for the tile's rows of activations.
    PerUnit,
}

impl MatmulKernels {
    /// `VIDLLM_MATMUL=cooperative | per-unit` overrides the choice for the devices
    /// `vidllm-native` opens (a diagnostic, as `VIDLLM_STEP_GRAPH=0` is); unset or
    /// anything else: [`MatmulKernels::Auto`].
    pub fn from_env() -> Self {
        match std::env::var("VIDLLM_MATMUL").as_deref() {
            Ok("cooperative") => Self::Cooperative,
            Ok("per-unit") => Self::PerUnit,
            _ => Self::Auto,
        }
    }

    pub fn id(self) -> u32 {
        self as u32
    }

    /// The kernels of a product's id (its low byte; [`Placement::product_id`]).
    pub fn from_id(id: u32) -> Self {
        match id & 0xff {
            1 => Self::Cooperative,
            2 => Self::PerUnit,
            _ => Self::Auto,
        }
    }
}

/// Where a model is loaded: the device, the binding cap it was opened under, the matmul
/// kernels its quantised matrices run, and (on the CPU) how finely their products
/// quantise the activations.
#[derive(Clone)]
pub struct Placement {
    pub device: Device,
    pub cap: BindingCap,
    pub matmul: MatmulKernels,
    /// The CPU backend's integer products; wgpu's kernels take f32 activations and ignore it.
    pub activations: ActBits,
}

impl Placement {
    /// `device` with no binding cap (the CPU, and tests of the unsplit paths).
    pub fn new(device: Device) -> Self {
        Self { device, cap: BindingCap::NONE, matmul: MatmulKernels::Auto, activations: ActBits::Int16 }
    }

    /// The same device under a tighter cap (tests of the split paths, small GPUs).
    pub fn capped(&self, bytes: u64) -> Self {
        Self { cap: self.cap.lower(bytes), ..self.clone() }
    }

    /// The same device with these matmul kernels (tests of both kinds on one device).
    pub fn with_matmul(&self, matmul: MatmulKernels) -> Self {
        Self { matmul, ..self.clone() }
    }

    /// The same device with the CPU's activations at `bits`.
    pub fn with_activations(&self, activations: ActBits) -> Self {
        Self { activations, ..self.clone() }
    }

    /// What a quantised product passes as its `kernels` (`QuantOps::q_matmul`).
    pub fn product_id(&self) -> u32 {
        self.matmul.id() | self.activations.flag()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Gpu,
    Cpu,
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "gpu" => Ok(Self::Gpu),
            "cpu" => Ok(Self::Cpu),
            other => Err(format!("unknown device {other:?} (auto, gpu, cpu)")),
        }
    }
}

/// The picked device and a human-readable name for logs.
#[derive(Clone)]
pub struct Picked {
    pub device: Device,
    pub name: String,
    pub is_gpu: bool,
    /// The adapter's storage-binding and buffer limits (burn opens the device with the
    /// adapter's own limits); none on the CPU.
    pub cap: BindingCap,
}

impl Picked {
    /// Where models load on this device.
    pub fn placement(&self) -> Placement {
        Placement { device: self.device.clone(), cap: self.cap, matmul: MatmulKernels::from_env(), activations: ActBits::Int16 }
    }
}

#[derive(Debug)]
pub struct NoAdapter;

impl std::fmt::Display for NoAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no GPU adapter found (wgpu sees none; install a Vulkan driver such as mesa-vulkan-drivers, or use --device cpu)")
    }
}

impl std::error::Error for NoAdapter {}

// Native device choice (this and the three below), where the CPU backend is the fallback.
#[cfg(all(feature = "gpu", feature = "cpu"))]
pub fn pick(choice: DeviceChoice) -> Result<Picked, NoAdapter> {
    let cpu = || Picked { device: Device::flex(), name: "cpu (flex)".into(), is_gpu: false, cap: BindingCap::NONE };
    if choice == DeviceChoice::Cpu {
        return Ok(cpu());
    }
    let mut adapters = adapters_with_limits();
    // The compute APIs before OpenGL: burn's wgpu runtime settles on them too.
    adapters.sort_by_key(|(a, _)| a.backend == wgpu::Backend::Gl);
    let hardware = adapters.iter().find(|(a, _)| is_hardware(a.device_type));
    let (chosen, limits) = match (choice, hardware) {
        (_, Some(a)) => a,
        (DeviceChoice::Auto, None) => return Ok(cpu()),
        (_, None) => adapters.first().ok_or(NoAdapter)?,
    };
    let cap = BindingCap::bytes(limits.max_storage_buffer_binding_size.min(limits.max_buffer_size));
    let kind = match chosen.device_type {
        wgpu::DeviceType::DiscreteGpu => DeviceKind::DiscreteGpu(0),
        wgpu::DeviceType::IntegratedGpu => DeviceKind::IntegratedGpu(0),
        wgpu::DeviceType::VirtualGpu => DeviceKind::VirtualGpu(0),
        wgpu::DeviceType::Cpu => DeviceKind::Cpu,
        wgpu::DeviceType::Other => DeviceKind::DefaultDevice,
    };
    let name = format!("gpu (wgpu {:?}: {})", chosen.backend, chosen.name);
    Ok(Picked { device: Device::wgpu(kind), name, is_gpu: true, cap })
}

#[cfg(all(feature = "gpu", feature = "cpu"))]
/// One device of a list such as `--devices cpu,gpu:1`: `cpu`, `gpu` (as `--device gpu`
/// picks), or `gpu:N`, the N-th adapter wgpu enumerates (`vidllm-native` lists them in
/// `--device` errors and `bench`), opened as burn opens that adapter type's k-th device.
pub fn pick_named(name: &str) -> Result<Picked, String> {
    match name {
        "cpu" => pick(DeviceChoice::Cpu).map_err(|e| e.to_string()),
        "gpu" => pick(DeviceChoice::Gpu).map_err(|e| e.to_string()),
        _ => {
            let n: usize = name
                .strip_prefix("gpu:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("unknown device {name:?} (cpu, gpu, gpu:N for the N-th adapter)"))?;
            let adapters = adapters_with_limits();
            let (info, limits) = adapters.get(n).ok_or_else(|| {
                let names: Vec<String> =
                    adapters.iter().enumerate().map(|(i, (a, _))| format!("gpu:{i} {} ({:?})", a.name, a.device_type)).collect();
                format!("no adapter gpu:{n}: wgpu sees {} [{}]", adapters.len(), names.join(", "))
            })?;
            // burn numbers devices within their type, in wgpu's order.
            let k = adapters[..n].iter().filter(|(a, _)| a.device_type == info.device_type).count();
            let kind = match info.device_type {
                wgpu::DeviceType::DiscreteGpu => DeviceKind::DiscreteGpu(k),
                wgpu::DeviceType::IntegratedGpu => DeviceKind::IntegratedGpu(k),
                wgpu::DeviceType::VirtualGpu => DeviceKind::VirtualGpu(k),
                wgpu::DeviceType::Cpu => DeviceKind::Cpu,
                wgpu::DeviceType::Other => DeviceKind::DefaultDevice,
            };
            let cap = BindingCap::bytes(limits.max_storage_buffer_binding_size.min(limits.max_buffer_size));
            let name = format!("gpu:{n} (wgpu {:?}: {})", info.backend, info.name);
            Ok(Picked { device: Device::wgpu(kind), name, is_gpu: true, cap })
        }
    }
}

#[cfg(all(feature = "gpu", feature = "cpu"))]
/// The hardware GPUs wgpu sees, each as [`pick_named`] opens it (`--devices auto`).
pub fn hardware_gpus() -> Vec<Picked> {
    let adapters = adapters_with_limits();
    (0..adapters.len()).filter(|&i| is_hardware(adapters[i].0.device_type)).filter_map(|i| pick_named(&format!("gpu:{i}")).ok()).collect()
}

#[cfg(all(feature = "gpu", feature = "cpu"))]
fn is_hardware(t: wgpu::DeviceType) -> bool {
    matches!(t, wgpu::DeviceType::DiscreteGpu | wgpu::DeviceType::IntegratedGpu)
}

#[cfg(feature = "gpu")]
/// Adapters wgpu can open here (natively).
pub fn list_adapters() -> Vec<wgpu::AdapterInfo> {
    adapters_with_limits().into_iter().map(|(info, _)| info).collect()
}

#[cfg(feature = "gpu")]
fn adapters_with_limits() -> Vec<(wgpu::AdapterInfo, wgpu::Limits)> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY)).iter().map(|a| (a.get_info(), a.limits())).collect()
}
