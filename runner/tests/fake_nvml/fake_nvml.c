/*
 * A stand-in for libnvidia-ml.so.1 with just the calls the runner makes, so the GPU
 * path (discovery, samples, heartbeats, summary, Xid events) is tested on machines
 * without a GPU. Built by runner/tests/gpu.rs with `cc -shared`.
 *
 * FAKE_NVML_DEVICES  number of GPUs (default 1)
 * FAKE_NVML_XID      an Xid code delivered once through the event set (default none)
 *
 * Device i reports utilisation 50+10i %, (i+1) GiB used of 80 GiB, 250+i W, 60+i °C.
 */
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <unistd.h>

typedef int nvmlReturn_t;
#define NVML_SUCCESS 0
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_TIMEOUT 10
#define XID_CRITICAL_ERROR 0x8ULL

struct device { unsigned int index; };
typedef struct device *nvmlDevice_t;
struct event_set { int registered; };
typedef struct event_set *nvmlEventSet_t;

typedef struct { unsigned int gpu; unsigned int memory; } nvmlUtilization_t;
typedef struct {
  unsigned int version;
  unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;
typedef struct {
  nvmlDevice_t device;
  unsigned long long eventType, eventData;
  unsigned int gpuInstanceId, computeInstanceId;
} nvmlEventData_t;

static struct device devices[16];
static unsigned int count = 1;
static long xid = -1;
static int xid_delivered = 0;

nvmlReturn_t nvmlInit_v2(void) {
  const char *n = getenv("FAKE_NVML_DEVICES");
  const char *x = getenv("FAKE_NVML_XID");
  count = n ? (unsigned int)atoi(n) : 1;
  if (count > 16) count = 16;
  for (unsigned int i = 0; i < count; i++) devices[i].index = i;
  xid = x ? atol(x) : -1;
  return NVML_SUCCESS;
}

nvmlReturn_t nvmlShutdown(void) { return NVML_SUCCESS; }

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
  return snprintf(version, length, "535.129.03") < (int)length ? NVML_SUCCESS
                                                               : NVML_ERROR_INSUFFICIENT_SIZE;
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *n) { *n = count; return NVML_SUCCESS; }

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int i, nvmlDevice_t *device) {
  if (i >= count) return NVML_ERROR_INVALID_ARGUMENT;
  *device = &devices[i];
  return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *name, unsigned int length) {
  (void)d;
  snprintf(name, length, "Fake A100-SXM4-80GB");
  return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *uuid, unsigned int length) {
  snprintf(uuid, length, "GPU-fake-%u", d->index);
  return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t d, nvmlMemory_v2_t *m) {
  m->total = 80ULL << 30;
  m->used = (unsigned long long)(d->index + 1) << 30;
  m->reserved = 0;
  m->free = m->total - m->used;
  return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t d, nvmlUtilization_t *u) {
  u->gpu = 50 + 10 * d->index;
  u->memory = 10;
  return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t d, unsigned int *milliwatts) {
  *milliwatts = 250000 + 1000 * d->index;
  return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t d, int sensor, unsigned int *celsius) {
  (void)sensor;
  *celsius = 60 + d->index;
  return NVML_SUCCESS;
}

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set) {
  *set = calloc(1, sizeof(struct event_set));
  return NVML_SUCCESS;
}

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) { free(set); return NVML_SUCCESS; }

nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t d, unsigned long long *types) {
  (void)d;
  *types = XID_CRITICAL_ERROR;
  return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t d, unsigned long long types,
                                      nvmlEventSet_t set) {
  (void)d; (void)types;
  set->registered = 1;
  return NVML_SUCCESS;
}

nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data,
                                 unsigned int timeout_ms) {
  if (set->registered && xid >= 0 && !xid_delivered) {
    xid_delivered = 1;
    memset(data, 0, sizeof(*data));
    data->device = &devices[0];
    data->eventType = XID_CRITICAL_ERROR;
    data->eventData = (unsigned long long)xid;
    return NVML_SUCCESS;
  }
  usleep(timeout_ms * 1000);
  return NVML_ERROR_TIMEOUT;
}
