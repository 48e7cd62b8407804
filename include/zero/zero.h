// The whole public API of zero.
#pragma once

#include "zero/comm.h"     // Comm, CommOptions, CommCounters, ReduceOp
#include "zero/engine.h"   // Engine, StepArgs, StepResult, MemoryReport, FullParamsScope
#include "zero/estimate.h" // Estimate, ModelDescription, TransformerShape, ChooseConfiguration
#include "zero/options.h"  // Options, ParamSpec, Stage, OptimizerKind
#include "zero/status.h"   // Status, ZERO_RETURN_IF_ERROR
#include "zero/types.h"    // DType, Backend, MemoryCategory, TensorView
