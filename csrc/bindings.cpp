// The only file that includes pybind11: argument checks, GIL release, error translation.
// The C++ core throws std::invalid_argument, which pybind11 turns into ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <string>
#include <vector>

#include "class_counter.h"
#include "rng.h"
#include "sampler.h"

namespace py = pybind11;

namespace {

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using U64Array = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>;

std::string str(const char* name) { return std::string(name); }

// ---- scalar arguments: TypeError for non-integers (like operator.index), ValueError when out of range ----------
py::int_ as_int(const py::handle& value, const char* name) {
  PyObject* index = PyNumber_Index(value.ptr());
  if (index == nullptr) {
    PyErr_Clear();
    throw py::type_error(str(name) + " must be an integer, got " + py::str(py::type::of(value).attr("__name__")).cast<std::string>());
  }
  return py::reinterpret_steal<py::int_>(index);
}

int64_t to_i64(const py::handle& value, const char* name, int64_t low, int64_t limit) {
  const py::int_ v = as_int(value, name);
  int overflow = 0;
  const long long x = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
  if (overflow != 0 || x < low || x >= limit) {
    throw py::value_error(str(name) + " must be in [" + std::to_string(low) + ", " + std::to_string(limit) +
                          "), got " + py::str(v).cast<std::string>());
  }
  return static_cast<int64_t>(x);
}

uint64_t to_u64(const py::handle& value, const char* name) {
  const py::int_ v = as_int(value, name);
  const unsigned long long x = PyLong_AsUnsignedLongLong(v.ptr());  // OverflowError for negatives and >= 2**64
  if (PyErr_Occurred() != nullptr) {
    PyErr_Clear();
    throw py::value_error(str(name) + " must be in [0, 2**64), got " + py::str(v).cast<std::string>());
  }
  return static_cast<uint64_t>(x);
}

constexpr int64_t kLimit62 = int64_t{1} << 62;

// ---- array arguments ------------------------------------------------------------------------------------------
py::array as_array(const py::handle& obj, const char* name) {
  py::array arr = py::array::ensure(obj);
  if (!arr) throw py::value_error(str(name) + " must be array-like");
  return arr;
}

void require_ndim(const py::array& arr, const char* name, py::ssize_t ndim) {
  if (arr.ndim() != ndim) {
    throw py::value_error(str(name) + " must be " + std::to_string(ndim) + "-D, got ndim=" + std::to_string(arr.ndim()));
  }
}

// 1-D integer array of any width as C-contiguous int64 (zero-copy when it already is); rejects float, bool, object.
I64Array int_array(const py::handle& obj, const char* name) {
  py::array arr = as_array(obj, name);
  const char kind = arr.dtype().kind();
  if (kind != 'i' && kind != 'u') {
    throw py::value_error(str(name) + " must be an integer array, got dtype " + py::str(arr.dtype()).cast<std::string>());
  }
  require_ndim(arr, name, 1);
  return I64Array::ensure(arr);
}

I64Array zeros(py::ssize_t n) { return I64Array(n); }

// ---- counters -------------------------------------------------------------------------------------------------
int threads_arg(const py::object& num_threads) { return static_cast<int>(to_i64(num_threads, "num_threads", 0, 1025)); }

template <typename T>
dnet_fast::CountStatus logits_counts(const py::array& logits, const int64_t* y, std::size_t n, int64_t num_classes,
                                     int64_t topk, int64_t* c, int64_t* t, int threads) {
  const auto arr = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(logits);
  const T* z = arr.data();
  py::gil_scoped_release release;
  return dnet_fast::count_from_logits<T>(z, y, n, num_classes, topk, c, t, threads);
}

py::tuple counts_from_logits(const py::object& logits, const py::object& label, const py::object& num_classes,
                             const py::object& topk, const py::object& num_threads) {
  py::array z = as_array(logits, "logits");
  const char kind = z.dtype().kind();
  if (kind != 'f' || z.itemsize() > 8) {
    throw py::value_error("logits must be a float16/32/64 array, got dtype " + py::str(z.dtype()).cast<std::string>());
  }
  require_ndim(z, "logits", 2);
  const I64Array y = int_array(label, "label");
  if (z.shape(0) != y.shape(0)) {
    throw py::value_error("logits has " + std::to_string(z.shape(0)) + " rows but label has " +
                          std::to_string(y.shape(0)) + " entries");
  }
  const int64_t classes = to_i64(num_classes, "num_classes", 1, dnet_fast::kMaxCount);
  if (z.shape(1) != classes) {
    throw py::value_error("logits has " + std::to_string(z.shape(1)) + " columns but num_classes = " +
                          std::to_string(classes));
  }
  const int64_t k = to_i64(topk, "topk", 1, classes + 1);
  const int threads = threads_arg(num_threads);
  I64Array correct = zeros(classes), total = zeros(classes);
  const auto n = static_cast<std::size_t>(y.shape(0));
  // float16 widens exactly to float32, so comparisons (and ties) are unchanged.
  const auto status = z.itemsize() == 8
                          ? logits_counts<double>(z, y.data(), n, classes, k, correct.mutable_data(),
                                                  total.mutable_data(), threads)
                          : logits_counts<float>(z, y.data(), n, classes, k, correct.mutable_data(),
                                                 total.mutable_data(), threads);
  if (status.kind == dnet_fast::CountStatus::kBadLabel) {
    throw py::value_error("label[" + std::to_string(status.index) + "] = " + std::to_string(y.data()[status.index]) +
                          " is outside [0, " + std::to_string(classes) + ")");
  }
  return py::make_tuple(correct, total);
}

void bind_counter(py::module_& m) {
  m.def("counts_from_logits", &counts_from_logits, py::arg("logits"), py::arg("label"), py::arg("num_classes"),
        py::arg("topk") = 1, py::arg("num_threads") = 0,
        "Per-class (correct, total) int64 arrays from (N, C) float logits; correct when the label ranks below topk "
        "(ties: lowest index wins) and the row is finite (a row with NaN or +-inf counts in total only).");
}

// ---- randomness and samplers ----------------------------------------------------------------------------------
U64Array random_bounded(const py::object& key, const py::object& bounds) {
  const uint64_t k = to_u64(key, "key");
  py::array arr = as_array(bounds, "bounds");
  const char kind = arr.dtype().kind();
  if (kind != 'i' && kind != 'u') {
    throw py::value_error("bounds must be an integer array, got dtype " + py::str(arr.dtype()).cast<std::string>());
  }
  require_ndim(arr, "bounds", 1);
  if (kind == 'i') {  // signed input: reject non-positive values before the unsigned view
    const I64Array s = I64Array::ensure(arr);
    for (py::ssize_t i = 0; i < s.shape(0); ++i) {
      if (s.data()[i] <= 0) throw py::value_error("bounds must be positive");
    }
  }
  const U64Array b = U64Array::ensure(arr);
  U64Array out(b.shape(0));
  const uint64_t* bp = b.data();
  uint64_t* o = out.mutable_data();
  const auto n = static_cast<std::size_t>(b.shape(0));
  for (std::size_t i = 0; i < n; ++i) {
    if (bp[i] == 0) throw py::value_error("bounds must be positive");
  }
  py::gil_scoped_release release;
  for (std::size_t i = 0; i < n; ++i) o[i] = dnet_fast::bounded(k, i, bp[i]);
  return out;
}

I64Array permutation(const py::object& n, const py::object& key) {
  const int64_t size = to_i64(n, "n", 0, dnet_fast::kMaxCount);
  const uint64_t k = to_u64(key, "key");
  I64Array out(size);
  int64_t* o = out.mutable_data();
  py::gil_scoped_release release;
  for (int64_t i = 0; i < size; ++i) o[i] = i;
  dnet_fast::permute(o, static_cast<std::size_t>(size), k);
  return out;
}

I64Array epoch_order(const py::object& labels, const py::object& kind, const py::object& seed, const py::object& epoch,
                     const py::object& rank, const py::object& world_size, const py::object& num_epochs,
                     const py::object& num_samples, const py::object& per_visit) {
  const I64Array y = int_array(labels, "labels");
  if (!py::isinstance<py::str>(kind)) {
    throw py::value_error("kind must be one of uniform, class_aware, sqrt, progressive; got " +
                          py::repr(kind).cast<std::string>());
  }
  dnet_fast::EpochSpec spec;
  spec.kind = dnet_fast::parse_epoch_kind(kind.cast<std::string>());
  spec.seed = to_u64(seed, "seed");
  spec.epoch = to_i64(epoch, "epoch", 0, dnet_fast::kMaxCount);
  spec.world_size = to_i64(world_size, "world_size", 1, dnet_fast::kMaxCount);
  spec.rank = to_i64(rank, "rank", 0, spec.world_size);
  spec.num_epochs = to_i64(num_epochs, "num_epochs", 1, dnet_fast::kMaxCount);
  spec.num_samples = to_i64(num_samples, "num_samples", -1, dnet_fast::kMaxCount);
  spec.per_visit = to_i64(per_visit, "per_visit", 1, dnet_fast::kMaxCount);
  const auto n = static_cast<std::size_t>(y.shape(0));
  I64Array out(dnet_fast::epoch_rank_length(spec, n));
  const int64_t* yp = y.data();
  int64_t* o = out.mutable_data();
  py::gil_scoped_release release;
  dnet_fast::epoch_order(yp, n, spec, o);
  return out;
}

std::unique_ptr<dnet_fast::MetaSampler> make_meta_sampler(const py::object& labels, const py::object& num_classes,
                                                          const py::object& seed) {
  const I64Array y = int_array(labels, "labels");
  const int64_t classes = to_i64(num_classes, "num_classes", 1, dnet_fast::kMaxCount);
  const uint64_t s = to_u64(seed, "seed");
  const int64_t* yp = y.data();
  const auto n = static_cast<std::size_t>(y.shape(0));
  py::gil_scoped_release release;
  return std::make_unique<dnet_fast::MetaSampler>(yp, n, classes, s);
}

I64Array meta_batches(dnet_fast::MetaSampler& sampler, const py::object& step, const py::object& k,
                      const py::object& m) {
  const int64_t s = to_i64(step, "step", 0, kLimit62), kk = to_i64(k, "k", 0, kLimit62);
  const int64_t mm = to_i64(m, "m", 1, dnet_fast::kMaxCount);
  dnet_fast::MetaSampler::check_request(s, kk, mm);
  I64Array out({kk, mm});
  int64_t* o = out.mutable_data();
  py::gil_scoped_release release;
  sampler.batches(s, kk, mm, o);
  return out;
}

void bind_sampler(py::module_& m) {
  m.def("random_bounded", &random_bounded, py::arg("key"), py::arg("bounds"),
        "uint64 out[i] uniform in [0, bounds[i]) from word i of stream key (Lemire's method).");
  m.def("permutation", &permutation, py::arg("n"), py::arg("key"),
        "Fisher-Yates permutation of range(n) keyed by key, int64.");
  m.def("epoch_order", &epoch_order, py::arg("labels"), py::arg("kind"), py::arg("seed"), py::arg("epoch"),
        py::arg("rank"), py::arg("world_size"), py::arg("num_epochs"), py::arg("num_samples"), py::arg("per_visit"),
        "One rank's int64 sample order for one epoch (num_samples -1 = len(labels)); see dnet_fast.sampling.");
  py::class_<dnet_fast::MetaSampler>(m, "MetaSampler", "Class-balanced meta batches, a pure function of (seed, step).")
      .def(py::init(&make_meta_sampler), py::arg("labels"), py::arg("num_classes"), py::arg("seed"),
           "Build the per-class index table (CSR) from (N,) integer labels in [0, num_classes).")
      .def("batches", &meta_batches, py::arg("step"), py::arg("k"), py::arg("m"),
           "Indices of meta batches step .. step + k - 1 as a (k, m) int64 array.")
      .def(
          "class_sizes",
          [](const dnet_fast::MetaSampler& s) {
            const auto sizes = s.class_sizes();
            I64Array out(static_cast<py::ssize_t>(sizes.size()));
            std::copy(sizes.begin(), sizes.end(), out.mutable_data());
            return out;
          },
          "(C,) int64 number of samples of each class.");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dnet-fast C++ engine: class-balanced sampling and per-class counting";
  bind_counter(m);
  bind_sampler(m);
}
