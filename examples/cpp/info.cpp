// Prints how libdenseclip_fast_ops was built, by calling the denseclip_fast::build_info operator through
// PyTorch's dispatcher, the way any C++ consumer reaches the library's operators.
#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>
#include <string>

int main() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("denseclip_fast::build_info", "")
                .typed<std::string()>();
  std::cout << op.call() << std::endl;
  return 0;
}
