// zero::Status: the result of every fallible call in zero's public API.
//
// A Status is either OK or carries a code and a message that says what went wrong, on which rank, and what to
// do about it. Statuses are cheap to copy when OK (no allocation).
#pragma once

#include <memory>
#include <string>
#include <string_view>

namespace zero {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,     // bad options, specs, or call arguments; nothing was changed
  kFailedPrecondition,  // a call out of protocol order (GradsReady twice, Step with units not ready, ...)
  kOutOfMemory,         // an allocation exceeded the device or host capacity; message has the breakdown
  kMismatch,            // ranks disagree (specs, micro-step, unit order); every rank gets this status
  kTimeout,             // a collective did not complete within Options::collective_timeout
  kAborted,             // a peer aborted the communicator; the message carries its reason
  kUnavailable,         // the requested backend is not available here (no GPU, no driver)
  kIoError,             // file system errors (checkpoints)
  kDataLoss,            // stored data is corrupt or malformed (checkpoint checksum, truncated or invalid file)
  kInternal,            // a bug in zero: please report it
};

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  static Status Ok() { return Status(); }
  static Status InvalidArgument(std::string_view msg) { return Status(StatusCode::kInvalidArgument, msg); }
  static Status FailedPrecondition(std::string_view msg) { return Status(StatusCode::kFailedPrecondition, msg); }
  static Status OutOfMemory(std::string_view msg) { return Status(StatusCode::kOutOfMemory, msg); }
  static Status Mismatch(std::string_view msg) { return Status(StatusCode::kMismatch, msg); }
  static Status Timeout(std::string_view msg) { return Status(StatusCode::kTimeout, msg); }
  static Status Aborted(std::string_view msg) { return Status(StatusCode::kAborted, msg); }
  static Status Unavailable(std::string_view msg) { return Status(StatusCode::kUnavailable, msg); }
  static Status IoError(std::string_view msg) { return Status(StatusCode::kIoError, msg); }
  static Status DataLoss(std::string_view msg) { return Status(StatusCode::kDataLoss, msg); }
  static Status Internal(std::string_view msg) { return Status(StatusCode::kInternal, msg); }

  bool ok() const { return state_ == nullptr; }
  StatusCode code() const { return state_ ? state_->code : StatusCode::kOk; }
  // The message without the code name; empty when OK.
  const std::string& message() const;
  // "OK" or "<CodeName>: <message>".
  std::string ToString() const;
  // Returns a copy whose message is prefixed with `context + ": "`.
  Status WithContext(std::string_view context) const;

 private:
  struct State {
    StatusCode code;
    std::string message;
  };
  Status(StatusCode code, std::string_view msg);
  std::shared_ptr<const State> state_;  // null when OK
};

const char* StatusCodeName(StatusCode code);

}  // namespace zero

// Propagates a non-OK status to the caller.
#define ZERO_RETURN_IF_ERROR(expr)                 \
  do {                                             \
    ::zero::Status zero_status_tmp_ = (expr);      \
    if (!zero_status_tmp_.ok()) return zero_status_tmp_; \
  } while (0)
