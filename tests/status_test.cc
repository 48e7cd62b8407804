// Status: codes, messages, context.
#include "zero/status.h"

#include <gtest/gtest.h>

namespace zero {
namespace {

TEST(StatusTest, OkHasNoMessage) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kOk);
  EXPECT_EQ(s.ToString(), "OK");
  EXPECT_TRUE(s.message().empty());
}

TEST(StatusTest, ErrorCarriesCodeAndMessage) {
  Status s = Status::InvalidArgument("bucket_elements must be >= 1");
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.ToString(), "InvalidArgument: bucket_elements must be >= 1");
  Status c = s.WithContext("rank 2");
  EXPECT_EQ(c.ToString(), "InvalidArgument: rank 2: bucket_elements must be >= 1");
  EXPECT_EQ(s.message(), "bucket_elements must be >= 1");  // original unchanged
}

Status Fails() { return Status::Timeout("late"); }
Status Propagates() {
  ZERO_RETURN_IF_ERROR(Status::Ok());
  ZERO_RETURN_IF_ERROR(Fails());
  return Status::Internal("not reached");
}

TEST(StatusTest, ReturnIfErrorPropagates) { EXPECT_EQ(Propagates().code(), StatusCode::kTimeout); }

}  // namespace
}  // namespace zero
