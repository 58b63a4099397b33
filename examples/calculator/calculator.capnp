# A calculator service, after the sample that ships with Cap'n Proto, written for capbus.
# Values and functions are capabilities: a value stays on the server until read, and a
# function may live on either side (the server calls back into the client's functions).
@0xdc2f23ad6aa37cd0;

interface Calculator {
  evaluate @0 (expression :Expression) -> (value :Value);
  # Evaluates an expression; the result stays on the server, as a Value capability.

  defFunction @1 (paramCount :Int32, body :Expression) -> (func :Function);
  # Defines a function of paramCount parameters; body refers to them by index.

  getOperator @2 (op :Operator) -> (func :Function);
  # One of the four arithmetic operators, as a two-parameter function.

  struct Expression {
    union {
      literal @0 :Float64;
      previousResult @1 :Value;
      parameter @2 :UInt32;
      call :group {
        function @3 :Function;
        params @4 :List(Expression);
      }
    }
  }

  interface Value {
    read @0 () -> (value :Float64);
  }

  interface Function {
    call @0 (params :List(Float64)) -> (value :Float64);
  }

  enum Operator {
    add @0;
    subtract @1;
    multiply @2;
    divide @3;
  }
}
